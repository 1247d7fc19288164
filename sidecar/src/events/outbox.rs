//! The durable outbox: one redb file, `<data-dir>/outbox.redb`, written by one thread.
//!
//! Tables:
//! - `events`: seq -> [`StoredEvent`] (the event as published);
//! - `deliveries`: (subscription, seq) -> [`DeliveryState`] (one per subscriber still owed it);
//! - `dead_letters`: (subscription, seq) -> [`DeadLetterRecord`] (the event copied in).
//!
//! Every change goes through the writer thread as an [`Op`]. The thread takes whatever ops
//! are queued, applies them in ONE write transaction and commits it durably (fsync) before
//! it answers any of them: a publish is acknowledged only once it is on disk, and a burst of
//! publishes shares one fsync (group commit). After the commit the thread hands the new
//! deliveries to the dispatcher. An event row goes when its last delivery row goes
//! (delivered, dead-lettered, or its subscription deleted).
//!
//! Readers (the dispatcher loading an event to deliver it, the admin listing dead letters)
//! use read transactions beside the writer.
//!
//! Accounting: an event counts what it stores ([`stored_bytes`]: the whole encoded record,
//! id, source, type, subject, extensions and key as well as the data, plus a delivery row
//! per subscription), so attributes cannot fill the disk past the bound unseen. Dead letters
//! have their own bound ([`DeadBound`]): past it the oldest dead letter goes (the
//! subscription's own first), so a subscriber that refuses everything cannot make publishes
//! to other topics fail with `outbox-full`.

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sinew_proto::v1::{DeadLetter, DeadLetterRecord, DeliveryState, StoredEvent};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

const EVENTS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("events");
const DELIVERIES: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("deliveries");
const DEAD: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("dead_letters");

/// How many ops one transaction takes at most.
const BATCH: usize = 4096;

/// A delivery the dispatcher must make (new, recovered at start, or replayed).
#[derive(Debug, Clone)]
pub struct Pending {
    pub subscription: String,
    pub seq: u64,
    pub key: String,
    pub topic: String,
    pub attempts: u32,
    pub next_unix_ms: i64,
    pub stored_unix_ms: i64,
}

/// An event to store, with the subscriptions that must receive it.
#[derive(Debug)]
pub struct NewEvent {
    pub event: StoredEvent,
    pub subscriptions: Vec<String>,
}

/// Which dead letters an admin operation touches; empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub topic: String,
    pub service: String,
    pub event_ids: Vec<String>,
    /// Dead no later than this (0: any time).
    pub dead_by_unix_ms: i64,
}

impl Filter {
    pub(crate) fn matches(&self, record: &DeadLetterRecord) -> bool {
        let event = record.event.as_ref();
        (self.topic.is_empty() || event.is_some_and(|e| e.topic == self.topic))
            && (self.service.is_empty() || record.service == self.service)
            && (self.event_ids.is_empty() || event.is_some_and(|e| self.event_ids.contains(&e.id)))
            && (self.dead_by_unix_ms == 0 || record.dead_unix_ms <= self.dead_by_unix_ms)
    }
}

/// Delivery bookkeeping, written by the dispatcher. Losing one to a crash means a delivery
/// is made again, which at-least-once allows; after a failed transaction it is written again.
#[derive(Debug, Clone)]
pub enum Note {
    /// Delivered, or its subscription is gone: the delivery row goes.
    Done { subscription: String, seq: u64 },
    /// An attempt failed; the next one is due at `next_unix_ms`.
    Retry {
        subscription: String,
        seq: u64,
        state: DeliveryState,
    },
    /// Failed for good: moved to the dead letters, and published again to `republish`
    /// (the subscription's dead-letter topic, with that topic's subscriptions), if set.
    Dead {
        subscription: String,
        service: String,
        seq: u64,
        attempts: u32,
        error: String,
        republish: Option<(String, Vec<String>)>,
    },
}

/// A change to the outbox.
#[derive(Debug)]
pub enum Op {
    Publish {
        events: Vec<NewEvent>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Delivery bookkeeping: nobody waits for it.
    Note(Note),
    /// At most [`ADMIN_CHUNK`] dead letters matching the filter, from `from` on, go in one
    /// transaction: replayed (pending deliveries again) or purged.
    Admin {
        replay: bool,
        filter: Filter,
        from: Option<DeadKey>,
        reply: AdminReply,
    },
}

/// A dead letter's key: (subscription, event sequence number).
pub type DeadKey = (String, u64);

/// How many dead letters were settled, and where the next chunk starts (`None`: done).
type AdminReply = oneshot::Sender<Result<(u64, Option<DeadKey>), String>>;

/// Dead letters one replay or purge transaction settles; a larger request is several
/// transactions, so publishes are not held up and memory stays bounded.
pub const ADMIN_CHUNK: usize = 500;

/// The extension attribute a dead-lettered event carries when it is republished to a
/// dead-letter topic (its value: the subscription that gave it up).
pub const DEAD_LETTER_MARK: &str = "sinewdeadletter";

/// What one delivery row costs beside its subscription name: the seq in its key and its
/// (small) state.
const DELIVERY_ROW: u64 = 16;

/// The bytes an event stores with its delivery rows: what the outbox bound counts.
pub fn stored_bytes(event: &StoredEvent, subscriptions: &[String]) -> u64 {
    event.encoded_len() as u64
        + subscriptions
            .iter()
            .map(|s| s.len() as u64 + DELIVERY_ROW)
            .sum::<u64>()
}

/// The bytes a dead letter stores (the record, the event inside, and its key).
fn dead_bytes(subscription: &str, record: &DeadLetterRecord) -> u64 {
    record.encoded_len() as u64 + subscription.len() as u64 + DELIVERY_ROW
}

/// The dead letters' own bound: past it the oldest go (`sinew_dead_letters_evicted_total`).
#[derive(Debug, Clone, Copy)]
pub struct DeadBound {
    pub max_events: u64,
    pub max_bytes: u64,
}

impl Default for DeadBound {
    fn default() -> Self {
        DeadBound {
            max_events: 10_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

/// What the publish side needs: the writer's queue and the fill level.
pub struct Outbox {
    db: Arc<Database>,
    ops: mpsc::Sender<Op>,
    /// Events stored and not yet delivered to every subscriber, and their stored bytes.
    pub events: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
    /// Dead letters kept, and their stored bytes: they have their own bound.
    pub dead_events: Arc<AtomicU64>,
    pub dead_bytes: Arc<AtomicU64>,
    /// Space promised to publishes on their way to the writer.
    reserved_events: AtomicU64,
    reserved_bytes: AtomicU64,
}

/// Space in the outbox held for one publish until it is stored (or failed).
pub struct Reservation<'a> {
    outbox: &'a Outbox,
    events: u64,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.outbox
            .reserved_events
            .fetch_sub(self.events, Ordering::Relaxed);
        self.outbox
            .reserved_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("events", &self.events.load(Ordering::Relaxed))
            .finish()
    }
}

/// Why an outbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "cannot open the outbox {path}: {source} (is another sidecar using the same --data-dir?)"
    )]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("outbox: {0}")]
    Redb(#[from] redb::Error),
    #[error("outbox: a stored record does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the outbox writer has stopped")]
    Stopped,
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for OutboxError {
            fn from(e: $t) -> Self {
                OutboxError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl Outbox {
    /// Opens (or creates) the outbox, recovers what is pending, and starts the writer
    /// thread. Returns the outbox and the deliveries still owed (in seq order); the writer
    /// sends every later delivery to `dispatch`.
    pub fn open(
        path: &Path,
        dispatch: mpsc::UnboundedSender<Vec<Pending>>,
        dead_bound: DeadBound,
    ) -> Result<(Outbox, Vec<Pending>), OutboxError> {
        let db = Database::create(path).map_err(|source| OutboxError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let db = Arc::new(db);
        let mut writer = Writer {
            db: db.clone(),
            live: BTreeMap::new(),
            live_bytes: 0,
            undo: Vec::new(),
            next_seq: 1,
            events: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
            dead_count: 0,
            dead_total_bytes: 0,
            dead_events: Arc::new(AtomicU64::new(0)),
            dead_bytes: Arc::new(AtomicU64::new(0)),
            dead_bound,
            dispatch,
        };
        let pending = writer.recover()?;
        let (ops, rx) = mpsc::channel(BATCH);
        let outbox = Outbox {
            db,
            ops,
            events: writer.events.clone(),
            bytes: writer.bytes.clone(),
            dead_events: writer.dead_events.clone(),
            dead_bytes: writer.dead_bytes.clone(),
            reserved_events: AtomicU64::new(0),
            reserved_bytes: AtomicU64::new(0),
        };
        std::thread::Builder::new()
            .name("sinew-outbox".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OutboxError::Redb(redb::Error::Io(e)))?;
        Ok((outbox, pending))
    }

    /// Holds room for `events` events of `bytes` stored bytes ([`stored_bytes`]), if the
    /// pending events and other publishes on their way stay within `max_events` and
    /// `max_bytes` with them. Dead letters are not counted: they have their own bound.
    pub fn reserve(
        &self,
        events: u64,
        bytes: u64,
        max_events: u64,
        max_bytes: u64,
    ) -> Option<Reservation<'_>> {
        let held_events = self.reserved_events.fetch_add(events, Ordering::Relaxed) + events;
        let held_bytes = self.reserved_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let reservation = Reservation {
            outbox: self,
            events,
            bytes,
        };
        let stored_events = self.events.load(Ordering::Relaxed);
        let stored_bytes = self.bytes.load(Ordering::Relaxed);
        (stored_events + held_events <= max_events && stored_bytes + held_bytes <= max_bytes)
            .then_some(reservation)
    }

    /// Stores events durably; resolves once they are on disk.
    pub async fn publish(&self, events: Vec<NewEvent>) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send(Op::Publish { events, reply })
            .await
            .map_err(|_| OutboxError::Stopped.to_string())?;
        answer.await.map_err(|_| OutboxError::Stopped.to_string())?
    }

    /// Queues delivery bookkeeping (nobody waits for its outcome).
    pub async fn send(&self, note: Note) {
        if self.ops.send(Op::Note(note)).await.is_err() {
            tracing::error!("{}", OutboxError::Stopped);
        }
    }

    /// Replays or purges dead letters; returns how many.
    pub async fn admin(&self, replay: bool, mut filter: Filter) -> Result<u64, String> {
        // Only what was dead when asked: a replayed event refused again at once comes back
        // under a later time and is not replayed twice by this request.
        filter.dead_by_unix_ms = unix_ms();
        let mut settled = 0;
        let mut from = None;
        loop {
            let (reply, answer) = oneshot::channel();
            let op = Op::Admin {
                replay,
                filter: filter.clone(),
                from,
                reply,
            };
            self.ops
                .send(op)
                .await
                .map_err(|_| OutboxError::Stopped.to_string())?;
            let (n, next) = answer
                .await
                .map_err(|_| OutboxError::Stopped.to_string())??;
            settled += n;
            match next {
                Some(next) => from = Some(next),
                None => return Ok(settled),
            }
        }
    }

    /// The stored event `seq`, if it is still there.
    pub fn event(&self, seq: u64) -> Result<Option<StoredEvent>, OutboxError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(EVENTS)?;
        let Some(row) = table.get(seq)? else {
            return Ok(None);
        };
        Ok(Some(StoredEvent::decode(row.value())?))
    }

    /// Dead letters matching `filter`: how many, and the first `limit` of them.
    pub fn dead_letters(
        &self,
        filter: &Filter,
        limit: usize,
    ) -> Result<(u64, Vec<DeadLetter>), OutboxError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(DEAD)?;
        let mut matched = 0;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (key, value) = row?;
            let record = DeadLetterRecord::decode(value.value())?;
            if !filter.matches(&record) {
                continue;
            }
            matched += 1;
            if out.len() < limit {
                let (subscription, _) = key.value();
                out.push(summary(subscription, &record));
            }
        }
        Ok((matched, out))
    }
}

pub(crate) fn summary(subscription: &str, record: &DeadLetterRecord) -> DeadLetter {
    let event = record.event.clone().unwrap_or_default();
    DeadLetter {
        event_id: event.id,
        topic: event.topic,
        subscription: subscription.to_string(),
        service: record.service.clone(),
        attempts: record.attempts,
        last_error: record.last_error.clone(),
        published_unix_ms: event.stored_unix_ms,
        dead_unix_ms: record.dead_unix_ms,
        node_id: String::new(),
        size: event.data.len() as u64,
    }
}

/// A stored event the writer tracks: how many deliveries it still owes, and its size.
#[derive(Debug, Clone, Copy)]
struct Live {
    owed: u32,
    bytes: u64,
    stored_unix_ms: i64,
}

struct Writer {
    db: Arc<Database>,
    live: BTreeMap<u64, Live>,
    /// The stored bytes of the `live` events ([`stored_bytes`]).
    live_bytes: u64,
    /// How to put `live` back if the running transaction fails: (seq, what it was).
    undo: Vec<(u64, Option<Live>)>,
    next_seq: u64,
    events: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    dead_count: u64,
    dead_total_bytes: u64,
    dead_events: Arc<AtomicU64>,
    dead_bytes: Arc<AtomicU64>,
    dead_bound: DeadBound,
    dispatch: mpsc::UnboundedSender<Vec<Pending>>,
}

/// What one transaction produced, to hand out after the commit.
#[derive(Default)]
struct Effects {
    pending: Vec<Pending>,
    publish_replies: Vec<oneshot::Sender<Result<(), String>>>,
    admin_replies: Vec<(AdminReply, (u64, Option<DeadKey>))>,
}

impl Writer {
    /// Rebuilds the in-memory view from the tables: every delivery row is owed again.
    /// Events nobody is owed any more (a crash between steps) are removed.
    fn recover(&mut self) -> Result<Vec<Pending>, OutboxError> {
        let txn = self.db.begin_write()?;
        let mut pending = Vec::new();
        {
            let mut events = txn.open_table(EVENTS)?;
            let deliveries = txn.open_table(DELIVERIES)?;
            let dead = txn.open_table(DEAD)?;
            let mut headers: BTreeMap<u64, (String, String, Live)> = BTreeMap::new();
            for row in events.iter()? {
                let (seq, value) = row?;
                let event = StoredEvent::decode(value.value())?;
                let live = Live {
                    owed: 0,
                    bytes: value.value().len() as u64,
                    stored_unix_ms: event.stored_unix_ms,
                };
                headers.insert(seq.value(), (event.key, event.topic, live));
            }
            for row in deliveries.iter()? {
                let (key, value) = row?;
                let (subscription, seq) = key.value();
                let state = DeliveryState::decode(value.value())?;
                let Some((key, topic, live)) = headers.get_mut(&seq) else {
                    continue;
                };
                live.owed += 1;
                live.bytes += subscription.len() as u64 + DELIVERY_ROW;
                pending.push(Pending {
                    subscription: subscription.to_string(),
                    seq,
                    key: key.clone(),
                    topic: topic.clone(),
                    attempts: state.attempts,
                    next_unix_ms: state.next_unix_ms,
                    stored_unix_ms: live.stored_unix_ms,
                });
            }
            let mut max_seq = headers.keys().next_back().copied().unwrap_or(0);
            // Dead letters are keyed by subscription first: every key counts for the next seq.
            for row in dead.iter()? {
                let (key, value) = row?;
                max_seq = max_seq.max(key.value().1);
                let (subscription, _) = key.value();
                self.dead_count += 1;
                self.dead_total_bytes +=
                    value.value().len() as u64 + subscription.len() as u64 + DELIVERY_ROW;
            }
            self.next_seq = max_seq + 1;
            for (seq, (_, _, live)) in headers {
                if live.owed == 0 {
                    events.remove(seq)?;
                } else {
                    self.live_bytes += live.bytes;
                    self.live.insert(seq, live);
                }
            }
        }
        txn.commit()?;
        pending.sort_by_key(|p| p.seq);
        self.publish_gauges();
        if !pending.is_empty() {
            tracing::info!(
                deliveries = pending.len(),
                events = self.live.len(),
                "resuming pending deliveries from the outbox"
            );
        }
        Ok(pending)
    }

    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut ops = vec![first];
            while ops.len() < BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            // Delivery bookkeeping is kept aside: if the transaction fails it is written again,
            // or the deliveries it settles would count against the bound until a restart.
            let notes: Vec<Note> = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Note(note) => Some(note.clone()),
                    _ => None,
                })
                .collect();
            let (result, effects) = self.transaction(ops);
            match result {
                Ok(()) => {
                    for reply in effects.publish_replies {
                        let _ = reply.send(Ok(()));
                    }
                    for (reply, answer) in effects.admin_replies {
                        let _ = reply.send(Ok(answer));
                    }
                    if !effects.pending.is_empty() {
                        let _ = self.dispatch.send(effects.pending);
                    }
                }
                Err(error) => {
                    // Nothing of the transaction happened: tell every waiting publisher, then
                    // write the bookkeeping again.
                    tracing::error!("outbox write failed: {error}");
                    for reply in effects.publish_replies {
                        let _ = reply.send(Err(error.to_string()));
                    }
                    for (reply, _) in effects.admin_replies {
                        let _ = reply.send(Err(error.to_string()));
                    }
                    self.rewrite(notes);
                }
            }
        }
    }

    /// Writes delivery bookkeeping again after a failed transaction, a few times with a
    /// growing pause. If the disk stays broken, those deliveries stay owed on disk (made
    /// again after a restart) and keep counting against the bound until then.
    fn rewrite(&mut self, notes: Vec<Note>) {
        let mut pause = Duration::from_millis(50);
        for attempt in 1..=8 {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(2));
            let copies: Vec<Op> = notes.iter().cloned().map(Op::Note).collect();
            let (result, effects) = self.transaction(copies);
            match result {
                Ok(()) => {
                    if !effects.pending.is_empty() {
                        let _ = self.dispatch.send(effects.pending);
                    }
                    return;
                }
                Err(e) => tracing::error!(attempt, "outbox bookkeeping write failed: {e}"),
            }
        }
    }

    /// Applies `ops` in one transaction; on failure the memory is put back as it was. The
    /// gauges are updated before anyone is answered: a publisher that hears 202 and
    /// publishes again must be measured against the new fill level.
    fn transaction(&mut self, ops: Vec<Op>) -> (Result<(), OutboxError>, Effects) {
        let (next_seq, live_bytes) = (self.next_seq, self.live_bytes);
        let (dead_count, dead_total_bytes) = (self.dead_count, self.dead_total_bytes);
        let mut effects = Effects::default();
        let result = self.apply_inner(ops, &mut effects);
        if result.is_err() {
            self.rollback(next_seq, live_bytes, dead_count, dead_total_bytes);
        }
        self.undo.clear();
        self.publish_gauges();
        (result, effects)
    }

    /// Puts the memory back as it was before a failed transaction.
    fn rollback(&mut self, next_seq: u64, live_bytes: u64, dead_count: u64, dead_bytes: u64) {
        while let Some((seq, before)) = self.undo.pop() {
            match before {
                Some(live) => self.live.insert(seq, live),
                None => self.live.remove(&seq),
            };
        }
        self.next_seq = next_seq;
        self.live_bytes = live_bytes;
        self.dead_count = dead_count;
        self.dead_total_bytes = dead_bytes;
    }

    /// Applies `ops` in one durable transaction, collecting what to hand out after it.
    fn apply_inner(&mut self, ops: Vec<Op>, effects: &mut Effects) -> Result<(), OutboxError> {
        let txn = self.db.begin_write()?;
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut deliveries = txn.open_table(DELIVERIES)?;
            let mut dead = txn.open_table(DEAD)?;
            let mut tables = Tables {
                events: &mut events,
                deliveries: &mut deliveries,
                dead: &mut dead,
            };
            for op in ops {
                match op {
                    Op::Publish { events, reply } => {
                        effects.publish_replies.push(reply);
                        for new in events {
                            self.store(&mut tables, new, effects)?;
                        }
                    }
                    Op::Note(Note::Done { subscription, seq }) => {
                        if tables
                            .deliveries
                            .remove((subscription.as_str(), seq))?
                            .is_some()
                        {
                            self.settle(&mut tables, seq)?;
                        }
                    }
                    Op::Note(Note::Retry {
                        subscription,
                        seq,
                        state,
                    }) => {
                        let key = (subscription.as_str(), seq);
                        if tables.deliveries.get(key)?.is_some() {
                            tables
                                .deliveries
                                .insert(key, state.encode_to_vec().as_slice())?;
                        }
                    }
                    Op::Note(Note::Dead {
                        subscription,
                        service,
                        seq,
                        attempts,
                        error,
                        republish,
                    }) => {
                        let key = (subscription.as_str(), seq);
                        if tables.deliveries.remove(key)?.is_none() {
                            continue;
                        }
                        let event = match tables.events.get(seq)? {
                            Some(row) => StoredEvent::decode(row.value())?,
                            None => continue,
                        };
                        // A dead-lettered event is republished once: one that already came
                        // from a dead-letter topic is not sent on (no loops between topics).
                        let again = republish
                            .filter(|_| !event.extensions.contains_key(DEAD_LETTER_MARK))
                            .map(|(topic, subscriptions)| {
                                let mut copy = StoredEvent {
                                    topic,
                                    stored_unix_ms: unix_ms(),
                                    ..event.clone()
                                };
                                copy.extensions
                                    .insert(DEAD_LETTER_MARK.into(), subscription.clone());
                                NewEvent {
                                    event: copy,
                                    subscriptions,
                                }
                            });
                        let record = DeadLetterRecord {
                            event: Some(event),
                            subscription: subscription.clone(),
                            service,
                            attempts,
                            last_error: error,
                            dead_unix_ms: unix_ms(),
                        };
                        self.dead_count += 1;
                        self.dead_total_bytes += dead_bytes(&subscription, &record);
                        tables.dead.insert(key, record.encode_to_vec().as_slice())?;
                        self.evict_dead(tables.dead, &subscription, seq)?;
                        self.settle(&mut tables, seq)?;
                        if let Some(new) = again {
                            self.store(&mut tables, new, effects)?;
                        }
                    }
                    Op::Admin {
                        replay,
                        filter,
                        from,
                        reply,
                    } => {
                        let (matching, next) = matching(tables.dead, &filter, from)?;
                        let n = matching.len() as u64;
                        for ((subscription, seq), record) in matching {
                            tables.dead.remove((subscription.as_str(), seq))?;
                            self.forget_dead(&subscription, &record);
                            let Some(mut event) = record.event.filter(|_| replay) else {
                                continue;
                            };
                            // A replayed event goes to the back, as a new publish would; its
                            // id (what subscribers de-duplicate on) is kept.
                            event.stored_unix_ms = unix_ms();
                            let new = NewEvent {
                                event,
                                subscriptions: vec![subscription],
                            };
                            self.store(&mut tables, new, effects)?;
                        }
                        effects.admin_replies.push((reply, (n, next)));
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Writes one event and its delivery rows (none: it is not stored at all).
    fn store(
        &mut self,
        tables: &mut Tables<'_, '_>,
        new: NewEvent,
        effects: &mut Effects,
    ) -> Result<(), OutboxError> {
        if new.subscriptions.is_empty() {
            return Ok(());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let event = new.event;
        tables
            .events
            .insert(seq, event.encode_to_vec().as_slice())?;
        let state = DeliveryState::default().encode_to_vec();
        for subscription in &new.subscriptions {
            tables
                .deliveries
                .insert((subscription.as_str(), seq), state.as_slice())?;
            effects.pending.push(Pending {
                subscription: subscription.clone(),
                seq,
                key: event.key.clone(),
                topic: event.topic.clone(),
                attempts: 0,
                next_unix_ms: 0,
                stored_unix_ms: event.stored_unix_ms,
            });
        }
        let bytes = stored_bytes(&event, &new.subscriptions);
        self.live_bytes += bytes;
        self.undo.push((seq, None));
        self.live.insert(
            seq,
            Live {
                owed: new.subscriptions.len() as u32,
                bytes,
                stored_unix_ms: event.stored_unix_ms,
            },
        );
        Ok(())
    }

    /// One delivery of `seq` is settled; the event goes when none is owed any more.
    fn settle(&mut self, tables: &mut Tables<'_, '_>, seq: u64) -> Result<(), OutboxError> {
        let Some(live) = self.live.get_mut(&seq) else {
            return Ok(());
        };
        self.undo.push((seq, Some(*live)));
        live.owed = live.owed.saturating_sub(1);
        if live.owed == 0 {
            self.live_bytes = self.live_bytes.saturating_sub(live.bytes);
            self.live.remove(&seq);
            tables.events.remove(seq)?;
        }
        Ok(())
    }

    fn forget_dead(&mut self, subscription: &str, record: &DeadLetterRecord) {
        self.dead_count = self.dead_count.saturating_sub(1);
        let bytes = dead_bytes(subscription, record);
        self.dead_total_bytes = self.dead_total_bytes.saturating_sub(bytes);
    }

    /// Keeps the dead letters within their bound once `(subscription, seq)` was added: the
    /// oldest of that subscription goes first (the one refusing everything pays for it),
    /// then the oldest of the subscription first in order. The new one is kept unless it
    /// alone is over the byte bound.
    fn evict_dead(
        &mut self,
        dead: &mut redb::Table<'_, (&'static str, u64), &'static [u8]>,
        subscription: &str,
        seq: u64,
    ) -> Result<(), OutboxError> {
        let bound = self.dead_bound;
        while self.dead_count > bound.max_events || self.dead_total_bytes > bound.max_bytes {
            let own = dead
                .range((subscription, 0)..(subscription, seq))?
                .next()
                .transpose()?
                .map(|(k, _)| k.value().1);
            let victim = match own {
                Some(old) => (subscription.to_string(), old),
                None => {
                    let first = dead
                        .iter()?
                        .map(|row| row.map(|(k, _)| (k.value().0.to_string(), k.value().1)))
                        .find(|row| !matches!(row, Ok((s, q)) if s == subscription && *q == seq))
                        .transpose()?;
                    match first {
                        Some(other) => other,
                        // Only the new one is left: it goes too if it alone is too large.
                        None => (subscription.to_string(), seq),
                    }
                }
            };
            let Some(row) = dead.remove((victim.0.as_str(), victim.1))? else {
                break;
            };
            let record = DeadLetterRecord::decode(row.value())?;
            drop(row);
            self.forget_dead(&victim.0, &record);
            metrics::counter!("sinew_dead_letters_evicted_total").increment(1);
            if victim.0 == subscription && victim.1 == seq {
                break;
            }
        }
        Ok(())
    }

    fn publish_gauges(&self) {
        let bytes = self.live_bytes;
        self.events.store(self.live.len() as u64, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        metrics::gauge!("sinew_outbox_events").set(self.live.len() as f64);
        metrics::gauge!("sinew_outbox_bytes").set(bytes as f64);
        self.dead_events.store(self.dead_count, Ordering::Relaxed);
        self.dead_bytes
            .store(self.dead_total_bytes, Ordering::Relaxed);
        metrics::gauge!("sinew_dead_letters").set(self.dead_count as f64);
        let oldest = self.live.values().next().map_or(0.0, |l| {
            (unix_ms() - l.stored_unix_ms).max(0) as f64 / 1000.0
        });
        metrics::gauge!("sinew_outbox_oldest_pending_seconds").set(oldest);
    }
}

struct Tables<'a, 't> {
    events: &'a mut redb::Table<'t, u64, &'static [u8]>,
    deliveries: &'a mut redb::Table<'t, (&'static str, u64), &'static [u8]>,
    dead: &'a mut redb::Table<'t, (&'static str, u64), &'static [u8]>,
}

/// A dead letter with its key (subscription, seq).
type Keyed = ((String, u64), DeadLetterRecord);

/// The dead letters matching `filter`, by key.
/// Up to [`ADMIN_CHUNK`] dead letters matching `filter`, from `from` on, and the key the
/// next chunk starts at (`None`: the table was scanned to its end).
fn matching(
    dead: &redb::Table<'_, (&'static str, u64), &'static [u8]>,
    filter: &Filter,
    from: Option<DeadKey>,
) -> Result<(Vec<Keyed>, Option<DeadKey>), OutboxError> {
    let mut out = Vec::new();
    let rows = match &from {
        Some((subscription, seq)) => dead.range((subscription.as_str(), *seq)..)?,
        None => dead.range::<(&str, u64)>(..)?,
    };
    for row in rows {
        let (key, value) = row?;
        let (subscription, seq) = key.value();
        if out.len() == ADMIN_CHUNK {
            return Ok((out, Some((subscription.to_string(), seq))));
        }
        let record = DeadLetterRecord::decode(value.value())?;
        if filter.matches(&record) {
            out.push(((subscription.to_string(), seq), record));
        }
    }
    Ok((out, None))
}

pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(id: &str, bytes: usize) -> StoredEvent {
        StoredEvent {
            id: id.into(),
            topic: "t".into(),
            data: vec![7; bytes],
            ..StoredEvent::default()
        }
    }

    async fn publish(outbox: &Outbox, id: &str, subs: &[&str]) {
        let new = NewEvent {
            event: event(id, 10),
            subscriptions: subs.iter().map(|s| s.to_string()).collect(),
        };
        outbox.publish(vec![new]).await.unwrap();
    }

    /// Opens the outbox, waiting while the previous writer thread still holds the file.
    async fn reopen(path: &Path) -> (Outbox, Vec<Pending>, mpsc::UnboundedReceiver<Vec<Pending>>) {
        reopen_with(path, DeadBound::default()).await
    }

    async fn reopen_with(
        path: &Path,
        bound: DeadBound,
    ) -> (Outbox, Vec<Pending>, mpsc::UnboundedReceiver<Vec<Pending>>) {
        for _ in 0..100 {
            let (tx, rx) = mpsc::unbounded_channel();
            if let Ok((outbox, pending)) = Outbox::open(path, tx, bound) {
                return (outbox, pending, rx);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the outbox did not reopen");
    }

    async fn settled(outbox: &Outbox, events: u64, dead: u64) {
        for _ in 0..200 {
            if outbox.events.load(Ordering::Relaxed) == events
                && outbox.dead_events.load(Ordering::Relaxed) == dead
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "outbox never reached {events} events and {dead} dead letters: {} and {}",
            outbox.events.load(Ordering::Relaxed),
            outbox.dead_events.load(Ordering::Relaxed)
        );
    }

    #[tokio::test]
    async fn pending_survives_a_restart_and_sequence_numbers_stay_unique() {
        let dir = std::env::temp_dir().join(format!("sinew-outbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("outbox.redb");
        {
            let (outbox, pending, mut rx) = reopen(&path).await;
            assert!(pending.is_empty());
            publish(&outbox, "e1", &["z-sub"]).await;
            publish(&outbox, "e2", &["a-sub"]).await;
            publish(&outbox, "e3", &["a-sub", "z-sub"]).await;
            let mut seqs = Vec::new();
            while seqs.len() < 4 {
                seqs.extend(
                    rx.recv()
                        .await
                        .unwrap()
                        .into_iter()
                        .map(|p| (p.subscription, p.seq)),
                );
            }
            assert_eq!(outbox.events.load(Ordering::Relaxed), 3);
            let dead = |subscription: &str, seq| Note::Dead {
                subscription: subscription.into(),
                service: "s".into(),
                seq,
                attempts: 1,
                error: "400".into(),
                republish: None,
            };
            // Dead letters under the alphabetically last subscription at a low seq, and
            // under the first one at the highest seq.
            outbox.send(dead("z-sub", 1)).await;
            outbox.send(dead("a-sub", 3)).await;
            outbox
                .send(Note::Done {
                    subscription: "a-sub".into(),
                    seq: 2,
                })
                .await;
            // A Done for a delivery that is not owed changes nothing.
            outbox
                .send(Note::Done {
                    subscription: "a-sub".into(),
                    seq: 2,
                })
                .await;
            settled(&outbox, 1, 2).await;
            let room = outbox.reserve(1, 10, 2, 1 << 20);
            assert!(
                room.is_some(),
                "1 pending + 1 fits in 2 (dead letters apart)"
            );
            assert!(
                outbox.reserve(1, 10, 2, 1 << 20).is_none(),
                "the held room counts"
            );
            drop(room);
            assert!(outbox.reserve(1, 10, 2, 1 << 20).is_some());
        }
        let (outbox, pending, rx) = reopen(&path).await;
        // Still owed: e3 to z-sub.
        let owed: Vec<(String, u64)> = pending
            .iter()
            .map(|p| (p.subscription.clone(), p.seq))
            .collect();
        assert_eq!(owed, [("z-sub".to_string(), 3)]);
        outbox
            .send(Note::Done {
                subscription: "z-sub".into(),
                seq: 3,
            })
            .await;
        settled(&outbox, 0, 2).await;
        drop((outbox, rx));
        // Nothing is pending now: only the dead letters (seqs 1 and 3) hold numbers.
        let (outbox, pending, mut rx) = reopen(&path).await;
        assert!(pending.is_empty());
        assert_eq!(outbox.dead_events.load(Ordering::Relaxed), 2);
        publish(&outbox, "e4", &["a-sub"]).await;
        let next = rx.recv().await.unwrap();
        assert_eq!(
            next[0].seq, 4,
            "after every seq in use, dead letters included"
        );
        let (matched, listed) = outbox.dead_letters(&Filter::default(), 10).unwrap();
        assert_eq!((matched, listed.len()), (2, 2));
        let n = outbox
            .admin(
                false,
                Filter {
                    event_ids: vec!["e1".into()],
                    ..Filter::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(n, 1);
        settled(&outbox, 1, 1).await;
        drop(outbox);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("sinew-outbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn every_stored_byte_counts_not_only_the_data() {
        let dir = scratch("bytes");
        let (outbox, _, _rx) = reopen(&dir.join("outbox.redb")).await;
        // No data at all, but a kilobyte of attributes.
        let mut event = event("an-id", 0);
        event.subject = "s".repeat(1000);
        event.source = "/svc/orders".into();
        event
            .extensions
            .insert("traceparent".into(), "t".repeat(100));
        event.key = "k".repeat(50);
        let subscriptions = vec!["billing-orders".to_string()];
        let counted = stored_bytes(&event, &subscriptions);
        assert!(counted > 1150, "{counted}");
        assert!(
            outbox.reserve(1, counted, 100, 1000).is_none(),
            "attributes alone can fill the byte bound"
        );
        outbox
            .publish(vec![NewEvent {
                event,
                subscriptions,
            }])
            .await
            .unwrap();
        settled(&outbox, 1, 0).await;
        assert_eq!(outbox.bytes.load(Ordering::Relaxed), counted);
        drop(outbox);
        // A restart counts the same bytes.
        let (outbox, _, _rx) = reopen(&dir.join("outbox.redb")).await;
        assert_eq!(outbox.bytes.load(Ordering::Relaxed), counted);
        drop(outbox);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn dead_letters_have_their_own_bound_and_the_oldest_go() {
        let dir = scratch("dead");
        let bound = DeadBound {
            max_events: 3,
            max_bytes: 1 << 20,
        };
        let (outbox, _, mut rx) = reopen_with(&dir.join("outbox.redb"), bound).await;
        let dead = |subscription: &str, seq| Note::Dead {
            subscription: subscription.into(),
            service: "s".into(),
            seq,
            attempts: 1,
            error: "400".into(),
            republish: None,
        };
        // `other` dead-letters one event; `refuser` refuses ten.
        publish(&outbox, "o-1", &["other"]).await;
        rx.recv().await.unwrap();
        outbox.send(dead("other", 1)).await;
        for i in 0..10 {
            publish(&outbox, &format!("r-{i}"), &["refuser"]).await;
            let seq = rx.recv().await.unwrap()[0].seq;
            outbox.send(dead("refuser", seq)).await;
        }
        settled(&outbox, 0, 3).await;
        let (matched, listed) = outbox.dead_letters(&Filter::default(), 10).unwrap();
        let mut ids: Vec<String> = listed.iter().map(|d| d.event_id.clone()).collect();
        ids.sort();
        assert_eq!(matched, 3);
        assert_eq!(
            ids,
            ["o-1", "r-8", "r-9"],
            "the refuser's oldest went; the other subscription's one stayed"
        );
        // Dead letters take no room from publishes: the pending bound is untouched.
        assert!(outbox.reserve(1, 10, 1, 1 << 10).is_some());
        drop(outbox);
        // After a restart the bound holds with what is on disk.
        let (outbox, _, _rx) = reopen_with(&dir.join("outbox.redb"), bound).await;
        assert_eq!(outbox.dead_events.load(Ordering::Relaxed), 3);
        drop(outbox);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
