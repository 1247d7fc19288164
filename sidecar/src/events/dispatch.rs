//! The dispatcher: one task that owns every pending delivery of this sidecar's outbox and
//! decides which to attempt next.
//!
//! Per subscription it keeps a queue:
//! - `ready`: deliveries that may go now, lowest sequence number first;
//! - `waiting`: deliveries backing off, by the time they are due;
//! - `keys`: per `sinew-key`, the deliveries of that key in publish order. Only the head of
//!   a key is ever ready, waiting or in flight, so an event of a key is never overtaken by a
//!   later one, even while it is retried.
//!
//! At most `max_in_flight` deliveries of a subscription are in flight at once. Each attempt
//! is a task that sends `POST <path>` to the subscribing service through the outbound path
//! (balancing, breakers, mTLS) and reports an [`Outcome`]; the dispatcher then records it in
//! the outbox: delivered, retry later (exponential backoff with full jitter, at least what
//! `Retry-After` asks), or dead letter.

use super::outbox::{Note, Outbox, Pending, unix_ms};
use super::wire;
use crate::outbound::Outbound;
use crate::snapshot::Subscription;
use crate::state::Shared;
use crate::transport::Transport;
use sinew_proto::v1::DeliveryState;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Delivered,
    /// 429, 5xx, timeout, connect failure, no endpoints...: try again later, not before
    /// `after` when the subscriber said so (`Retry-After`).
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// Any other answer: the subscriber refused the event; it goes to the dead letters.
    Refused { error: String },
    /// The event is no longer in the outbox (purged meanwhile).
    Gone,
}

#[derive(Debug)]
struct Attempt {
    subscription: String,
    seq: u64,
    outcome: Outcome,
}

#[derive(Debug)]
struct Item {
    key: String,
    topic: String,
    attempts: u32,
    stored_unix_ms: i64,
}

#[derive(Debug, Default)]
struct Queue {
    items: HashMap<u64, Item>,
    ready: BTreeSet<u64>,
    waiting: BTreeSet<(i64, u64)>,
    keys: HashMap<String, VecDeque<u64>>,
    in_flight: usize,
}

impl Queue {
    /// Adds a delivery; it becomes ready (or waits for its time) unless an earlier event of
    /// its key is still owed.
    fn push(&mut self, p: Pending) {
        let seq = p.seq;
        if self.items.contains_key(&seq) {
            return;
        }
        let first_of_key = if p.key.is_empty() {
            true
        } else {
            let queue = self.keys.entry(p.key.clone()).or_default();
            queue.push_back(seq);
            queue.len() == 1
        };
        let due = p.next_unix_ms;
        self.items.insert(
            seq,
            Item {
                key: p.key,
                topic: p.topic,
                attempts: p.attempts,
                stored_unix_ms: p.stored_unix_ms,
            },
        );
        if first_of_key {
            self.schedule(seq, due);
        }
    }

    fn schedule(&mut self, seq: u64, due_unix_ms: i64) {
        if due_unix_ms <= unix_ms() {
            self.ready.insert(seq);
        } else {
            self.waiting.insert((due_unix_ms, seq));
        }
    }

    /// Forgets a settled delivery and lets the next event of its key go.
    fn settle(&mut self, seq: u64) -> Option<Item> {
        let item = self.items.remove(&seq)?;
        self.ready.remove(&seq);
        if !item.key.is_empty()
            && let Some(queue) = self.keys.get_mut(&item.key)
        {
            queue.retain(|s| *s != seq);
            match queue.front().copied() {
                Some(next) => self.schedule(next, 0),
                None => {
                    self.keys.remove(&item.key);
                }
            }
        }
        Some(item)
    }

    /// Moves due deliveries from `waiting` to `ready`.
    fn promote(&mut self, now_unix_ms: i64) {
        while let Some(&(due, seq)) = self.waiting.first() {
            if due > now_unix_ms {
                break;
            }
            self.waiting.pop_first();
            self.ready.insert(seq);
        }
    }
}

pub struct Dispatcher<T> {
    shared: Arc<Shared>,
    outbound: Arc<Outbound<T>>,
    outbox: Arc<Outbox>,
    queues: HashMap<String, Queue>,
    attempts_tx: mpsc::UnboundedSender<Attempt>,
}

impl<T: Transport> Dispatcher<T> {
    /// Runs until shutdown: `recovered` first, then whatever the outbox hands over.
    pub async fn run(
        shared: Arc<Shared>,
        outbound: Arc<Outbound<T>>,
        outbox: Arc<Outbox>,
        recovered: Vec<Pending>,
        mut incoming: mpsc::UnboundedReceiver<Vec<Pending>>,
    ) {
        let (attempts_tx, mut attempts) = mpsc::unbounded_channel();
        let mut me = Dispatcher {
            shared,
            outbound,
            outbox,
            queues: HashMap::new(),
            attempts_tx,
        };
        me.enqueue(recovered);
        let mut shutdown = me.shared.shutdown.subscribe();
        // Re-reads the policy now and then: a subscription that appears, changes its limits
        // or goes away while nothing else happens.
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            me.dispatch();
            let wake = me
                .next_due()
                .map(|due| Duration::from_millis((due - unix_ms()).max(0) as u64));
            let sleep = tokio::time::sleep(wake.unwrap_or(Duration::from_secs(3600)));
            tokio::select! {
                batch = incoming.recv() => match batch {
                    Some(batch) => me.enqueue(batch),
                    None => return,
                },
                Some(attempt) = attempts.recv() => me.finish(attempt).await,
                _ = sleep, if wake.is_some() => {}
                _ = tick.tick() => {}
                _ = crate::state::shutdown_begun(&mut shutdown) => return,
            }
            let now = unix_ms();
            for queue in me.queues.values_mut() {
                queue.promote(now);
            }
        }
    }

    fn enqueue(&mut self, batch: Vec<Pending>) {
        for p in batch {
            self.queues
                .entry(p.subscription.clone())
                .or_default()
                .push(p);
        }
    }

    fn next_due(&self) -> Option<i64> {
        self.queues
            .values()
            .filter_map(|q| q.waiting.first().map(|(due, _)| *due))
            .min()
    }

    /// Starts every attempt that may go now.
    fn dispatch(&mut self) {
        let snapshot = self.shared.snapshot.load();
        if snapshot.version == 0 {
            // No policy yet (first start, control plane away): keep everything owed.
            return;
        }
        let mut dropped = Vec::new();
        for (name, queue) in &mut self.queues {
            let Some(subscription) = snapshot.subscriptions.get(name) else {
                // The subscription was deleted: its deliveries end with it.
                let seqs: Vec<u64> = queue.ready.iter().copied().collect();
                for seq in seqs {
                    queue.settle(seq);
                    dropped.push((name.clone(), seq));
                }
                continue;
            };
            let max = subscription.spec.delivery.max_in_flight as usize;
            while queue.in_flight < max {
                let Some(seq) = queue.ready.pop_first() else {
                    break;
                };
                queue.in_flight += 1;
                let item = &queue.items[&seq];
                tokio::spawn(attempt(
                    self.outbound.clone(),
                    self.outbox.clone(),
                    subscription.clone(),
                    seq,
                    item.topic.clone(),
                    self.attempts_tx.clone(),
                ));
            }
        }
        self.queues
            .retain(|_, q| !q.items.is_empty() || q.in_flight > 0);
        if !dropped.is_empty() {
            tracing::info!(
                deliveries = dropped.len(),
                "dropping deliveries of deleted subscriptions"
            );
            metrics::counter!("sinew_events_unsubscribed_total").increment(dropped.len() as u64);
            let outbox = self.outbox.clone();
            tokio::spawn(async move {
                for (subscription, seq) in dropped {
                    outbox.send(Note::Done { subscription, seq }).await;
                }
            });
        }
    }

    async fn finish(&mut self, attempt: Attempt) {
        let Attempt {
            subscription: name,
            seq,
            outcome,
        } = attempt;
        let snapshot = self.shared.snapshot.load();
        let subscription = snapshot.subscriptions.get(&name).cloned();
        let Some(queue) = self.queues.get_mut(&name) else {
            return;
        };
        queue.in_flight = queue.in_flight.saturating_sub(1);
        let (topic, service) = match (queue.items.get(&seq), &subscription) {
            (Some(item), Some(s)) => (item.topic.clone(), s.spec.service.clone()),
            (Some(item), None) => (item.topic.clone(), String::new()),
            (None, _) => return,
        };
        match outcome {
            Outcome::Delivered | Outcome::Gone => {
                if let Some(item) = queue.settle(seq)
                    && outcome == Outcome::Delivered
                {
                    metrics::counter!("sinew_events_delivered_total", "topic" => topic.clone(), "subscriber" => service.clone()).increment(1);
                    let age = (unix_ms() - item.stored_unix_ms).max(0) as f64 / 1000.0;
                    metrics::histogram!("sinew_event_delivery_seconds", "topic" => topic, "subscriber" => service).record(age);
                }
                self.outbox
                    .send(Note::Done {
                        subscription: name,
                        seq,
                    })
                    .await;
            }
            Outcome::Retry { error, after } => {
                let Some(subscription) = subscription else {
                    // Deleted meanwhile: the next dispatch drops it.
                    queue.ready.insert(seq);
                    return;
                };
                let delivery = &subscription.spec.delivery;
                let attempts = match queue.items.get_mut(&seq) {
                    Some(item) => {
                        item.attempts += 1;
                        item.attempts
                    }
                    None => return,
                };
                if attempts >= delivery.max_attempts {
                    let error =
                        format!("{error} (attempt {attempts} of {})", delivery.max_attempts);
                    self.dead(&subscription, seq, attempts, error).await;
                    return;
                }
                metrics::counter!("sinew_events_retried_total", "topic" => topic, "subscriber" => service).increment(1);
                let delay = backoff(delivery.backoff.base, delivery.backoff.max, attempts)
                    .max(after.unwrap_or_default());
                let due = unix_ms() + delay.as_millis() as i64;
                queue.waiting.insert((due, seq));
                tracing::debug!(subscription = %name, seq, attempts, %error, ?delay, "delivery failed; retrying");
                self.outbox
                    .send(Note::Retry {
                        subscription: name,
                        seq,
                        state: DeliveryState {
                            attempts,
                            next_unix_ms: due,
                            last_error: error,
                        },
                    })
                    .await;
            }
            Outcome::Refused { error } => {
                let Some(subscription) = subscription else {
                    queue.ready.insert(seq);
                    return;
                };
                let attempts = queue.items.get(&seq).map_or(1, |i| i.attempts + 1);
                self.dead(&subscription, seq, attempts, error).await;
            }
        }
    }

    /// Moves a delivery to the dead letters (and its dead-letter topic, if any).
    async fn dead(&mut self, subscription: &Subscription, seq: u64, attempts: u32, error: String) {
        let Some(item) = self
            .queues
            .get_mut(&subscription.name)
            .and_then(|q| q.settle(seq))
        else {
            return;
        };
        tracing::warn!(subscription = %subscription.name, topic = %item.topic, %error, "event dead-lettered");
        metrics::counter!("sinew_events_dead_lettered_total", "topic" => item.topic, "subscriber" => subscription.spec.service.clone()).increment(1);
        let republish = subscription
            .spec
            .delivery
            .dead_letter_topic
            .as_ref()
            .map(|topic| {
                let subs = self.shared.snapshot.load().subscribers(topic);
                (topic.clone(), subs.iter().map(|s| s.name.clone()).collect())
            });
        self.outbox
            .send(Note::Dead {
                subscription: subscription.name.clone(),
                service: subscription.spec.service.clone(),
                seq,
                attempts,
                error,
                republish,
            })
            .await;
    }
}

/// Exponential backoff with full jitter: a random time up to `base × 2^(attempt-1)`,
/// capped at `max`, and at least 1 ms.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(30))
        .min(max);
    let ms = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(fastrand::u64(1..=ms))
}

/// One attempt: load the event, send it, classify the answer.
async fn attempt<T: Transport>(
    outbound: Arc<Outbound<T>>,
    outbox: Arc<Outbox>,
    subscription: Arc<Subscription>,
    seq: u64,
    topic: String,
    done: mpsc::UnboundedSender<Attempt>,
) {
    let outcome = match outbox.event(seq) {
        Ok(Some(event)) => deliver(&outbound, &subscription, &event).await,
        Ok(None) => Outcome::Gone,
        Err(e) => Outcome::Retry {
            error: format!("reading the outbox: {e}"),
            after: None,
        },
    };
    if let Outcome::Retry { error, .. } | Outcome::Refused { error } = &outcome {
        tracing::debug!(subscription = %subscription.name, %topic, seq, %error, "delivery attempt failed");
    }
    let _ = done.send(Attempt {
        subscription: subscription.name.clone(),
        seq,
        outcome,
    });
}

async fn deliver<T: Transport>(
    outbound: &Outbound<T>,
    subscription: &Subscription,
    event: &sinew_proto::v1::StoredEvent,
) -> Outcome {
    let spec = &subscription.spec;
    let request = match wire::delivery_request(&spec.service, &spec.path(), event) {
        Ok(request) => request,
        Err(error) => return Outcome::Refused { error },
    };
    let sent =
        tokio::time::timeout(spec.delivery.timeout, outbound.call(&spec.service, request)).await;
    match sent {
        Err(_) => Outcome::Retry {
            error: format!("no answer within {:?}", spec.delivery.timeout),
            after: None,
        },
        Ok(Err((error, _))) => Outcome::Retry {
            error: error.to_string(),
            after: None,
        },
        Ok(Ok((response, _))) => classify(response.status(), response.headers()),
    }
}

/// 2xx delivered; 429 and 5xx retried (honouring `Retry-After` in seconds); anything else
/// refused.
pub fn classify(status: http::StatusCode, headers: &http::HeaderMap) -> Outcome {
    if status.is_success() {
        return Outcome::Delivered;
    }
    let reason = headers
        .get(crate::errors::HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    let error = format!("the subscriber answered {status}{reason}");
    if status == http::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        // Seconds, or an HTTP date (RFC 9110 §10.2.3).
        let after = headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| match v.trim().parse::<u64>() {
                Ok(secs) => Some(Duration::from_secs(secs)),
                Err(_) => httpdate::parse_http_date(v.trim())
                    .ok()?
                    .duration_since(std::time::SystemTime::now())
                    .ok(),
            })
            .map(|d| d.min(Duration::from_secs(3600)));
        Outcome::Retry { error, after }
    } else {
        Outcome::Refused { error }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pending(seq: u64, key: &str) -> Pending {
        Pending {
            subscription: "s".into(),
            seq,
            key: key.into(),
            topic: "t".into(),
            attempts: 0,
            next_unix_ms: 0,
            stored_unix_ms: 0,
        }
    }

    #[test]
    fn a_key_goes_one_event_at_a_time_in_order_and_keyless_ones_all_at_once() {
        let mut q = Queue::default();
        for (seq, key) in [(1, "a"), (2, "a"), (3, ""), (4, "b"), (5, "a"), (6, "")] {
            q.push(pending(seq, key));
        }
        assert_eq!(q.ready.iter().copied().collect::<Vec<_>>(), [1, 3, 4, 6]);
        // 1 fails and waits: 2 (same key) must not become ready.
        q.ready.remove(&1);
        q.waiting.insert((unix_ms() + 60_000, 1));
        assert!(!q.ready.contains(&2));
        q.settle(4);
        assert!(
            !q.ready.contains(&2),
            "settling another key frees nothing of `a`"
        );
        // 1 is delivered: 2 is next, then 5.
        q.settle(1);
        assert!(q.ready.contains(&2) && !q.ready.contains(&5));
        q.settle(2);
        assert!(q.ready.contains(&5));
        q.settle(5);
        assert!(!q.keys.contains_key("a"));
    }

    #[test]
    fn recovered_deliveries_wait_for_their_time() {
        let mut q = Queue::default();
        let mut p = pending(7, "");
        p.next_unix_ms = unix_ms() + 10_000;
        q.push(p);
        assert!(q.ready.is_empty());
        q.promote(unix_ms());
        assert!(q.ready.is_empty());
        q.promote(unix_ms() + 20_000);
        assert!(q.ready.contains(&7));
    }

    #[test]
    fn backoff_grows_with_full_jitter_up_to_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 1..12 {
            let ceiling = (100u64 << (attempt - 1)).min(2000);
            for _ in 0..50 {
                let d = backoff(base, max, attempt).as_millis() as u64;
                assert!((1..=ceiling).contains(&d), "attempt {attempt}: {d}");
            }
        }
        // Full jitter: not always the ceiling.
        let samples: BTreeSet<u128> = (0..50).map(|_| backoff(base, max, 5).as_millis()).collect();
        assert!(samples.len() > 5);
    }

    #[test]
    fn answers_are_classified() {
        use http::{HeaderMap, HeaderValue, StatusCode};
        let none = HeaderMap::new();
        assert_eq!(classify(StatusCode::OK, &none), Outcome::Delivered);
        assert_eq!(classify(StatusCode::NO_CONTENT, &none), Outcome::Delivered);
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, &none),
            Outcome::Refused { .. }
        ));
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, &none),
            Outcome::Refused { .. }
        ));
        let mut later = HeaderMap::new();
        later.insert(http::header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, &later),
            Outcome::Retry {
                error: "the subscriber answered 429 Too Many Requests".into(),
                after: Some(Duration::from_secs(7)),
            }
        );
        assert!(matches!(
            classify(StatusCode::SERVICE_UNAVAILABLE, &none),
            Outcome::Retry { after: None, .. }
        ));
        let mut dated = HeaderMap::new();
        let when = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        dated.insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_str(&when).unwrap(),
        );
        let Outcome::Retry {
            after: Some(after), ..
        } = classify(StatusCode::SERVICE_UNAVAILABLE, &dated)
        else {
            panic!("a dated Retry-After is honoured");
        };
        assert!(after > Duration::from_secs(100) && after <= Duration::from_secs(120));
    }
}
