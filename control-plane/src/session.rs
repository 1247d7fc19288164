//! One sidecar's `Connect` stream, after its Hello: push Updates, take Acks, Nacks and Health.
//!
//! Each stream is one task that waits on three things: a message from the sidecar, a new
//! snapshot, or being replaced by a newer stream with the same node id. A new snapshot is
//! diffed against what this sidecar was sent ([`SentView`]); most changes elsewhere in the
//! mesh cost a stream a few pointer comparisons and send nothing.

use crate::mesh::Mesh;
use crate::metrics as m;
use crate::sync::{Answer, new_nonce};
use crate::view::SentView;
use prost::Message;
use sinew_proto::v1::{
    ControlMessage, EventsReply, EventsRequest, SidecarMessage, Update, control_message,
    sidecar_message,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Status, Streaming};

type Outbound = mpsc::Sender<Result<ControlMessage, Status>>;

#[derive(Debug)]
struct Open {
    session: u64,
    /// Dropped (replaced) to end the stream task.
    _replaced: watch::Sender<()>,
    /// The stream's way to its sidecar, for questions about events.
    outbound: Outbound,
    /// `Hello.events_store`: empty, or a store shared with other sidecars.
    events_store: String,
}

/// The open streams by node id, so a newer stream can end the older one, and so the admin
/// API can ask every sidecar about the events in its outbox.
#[derive(Debug, Default)]
pub struct Streams {
    open: Mutex<HashMap<String, Open>>,
    /// Questions sent to sidecars, by id, waiting for their EventsReply.
    pending: Mutex<HashMap<u64, oneshot::Sender<EventsReply>>>,
    next_id: AtomicU64,
}

impl Streams {
    /// Makes `session` the stream of `node_id`; the previous one (if any) sees its receiver
    /// close and ends.
    ///
    /// Two streams of one node can race between registering and installing; sessions grow
    /// monotonically, so an older one that installs last is already replaced (its receiver's
    /// sender is gone at once) and never takes the record from the newer one.
    pub fn install(
        &self,
        node_id: &str,
        session: u64,
        outbound: Outbound,
        events_store: &str,
    ) -> watch::Receiver<()> {
        let (tx, rx) = watch::channel(());
        let mut open = self.lock();
        if open.get(node_id).is_some_and(|o| o.session > session) {
            return rx;
        }
        let entry = Open {
            session,
            _replaced: tx,
            outbound,
            events_store: events_store.to_string(),
        };
        open.insert(node_id.to_string(), entry);
        rx
    }

    /// Forgets `session`, if it is still the stream of `node_id`.
    pub fn remove(&self, node_id: &str, session: u64) {
        let mut open = self.lock();
        if open.get(node_id).is_some_and(|o| o.session == session) {
            open.remove(node_id);
        }
    }

    /// Sends `request` to every connected sidecar with its own outbox, and to one sidecar of
    /// each shared store (the first by node id), and waits (at most `wait`) for their
    /// answers. Returns the answers by node id, and the nodes that did not answer in time.
    pub async fn ask_all(
        &self,
        request: &EventsRequest,
        wait: Duration,
    ) -> (Vec<(String, EventsReply)>, Vec<String>) {
        let targets: Vec<(String, Outbound)> = {
            let open = self.lock();
            let mut nodes: Vec<(&String, &Open)> = open.iter().collect();
            nodes.sort_by(|a, b| a.0.cmp(b.0));
            let mut stores = std::collections::HashSet::new();
            nodes
                .into_iter()
                .filter(|(_, o)| o.events_store.is_empty() || stores.insert(&o.events_store))
                .map(|(node, o)| (node.clone(), o.outbound.clone()))
                .collect()
        };
        let mut waiting = Vec::with_capacity(targets.len());
        let mut silent = Vec::new();
        for (node, outbound) in targets {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            let (tx, rx) = oneshot::channel();
            self.pending_lock().insert(id, tx);
            let message = ControlMessage {
                kind: Some(control_message::Kind::EventsRequest(EventsRequest {
                    id,
                    ..request.clone()
                })),
            };
            match outbound.try_send(Ok(message)) {
                Ok(()) => waiting.push((node, id, rx)),
                Err(_) => {
                    self.pending_lock().remove(&id);
                    silent.push(format!("{node}: its stream is busy or closed"));
                }
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut answers = Vec::with_capacity(waiting.len());
        for (node, id, rx) in waiting {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(reply)) => answers.push((node, reply)),
                _ => {
                    self.pending_lock().remove(&id);
                    silent.push(format!("{node}: no answer within {wait:?}"));
                }
            }
        }
        (answers, silent)
    }

    /// A sidecar's answer to [`Streams::ask_all`].
    fn answer(&self, reply: EventsReply) {
        if let Some(tx) = self.pending_lock().remove(&reply.id) {
            let _ = tx.send(reply);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Open>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<EventsReply>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Everything a stream task needs.
pub struct Session {
    pub mesh: Arc<Mesh>,
    pub streams: Arc<Streams>,
    pub node_id: String,
    pub service: String,
    pub session: u64,
    pub inbound: Streaming<SidecarMessage>,
    pub outbound: mpsc::Sender<Result<ControlMessage, Status>>,
    pub replaced: watch::Receiver<()>,
    pub shutdown: watch::Receiver<bool>,
    /// Updates larger than this are not sent (see [`sinew_proto::limits`]).
    pub max_update_bytes: usize,
}

/// Why a stream task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The sidecar went away (or the control plane is stopping): the lease starts.
    Gone,
    /// A newer stream with the same node id owns the record now.
    Replaced,
}

impl Session {
    /// Runs the stream until it ends, then starts the instance's lease.
    pub async fn run(mut self) {
        let mut snapshots = self.mesh.subscribe();
        let mut view = SentView::new(&self.service);
        let first = snapshots.borrow_and_update().clone();
        // The first Update is always the full view (possibly empty).
        let sent = match view.next_update(&first) {
            Some(update) => self.send(update, &mut view).await,
            None => true,
        };
        let end = if sent {
            self.serve(&mut view, &mut snapshots).await
        } else {
            End::Gone
        };
        if end == End::Gone {
            self.mesh.disconnect(&self.node_id, self.session);
            self.streams.remove(&self.node_id, self.session);
        }
        tracing::info!(node_id = %self.node_id, service = %self.service, ?end, "sidecar stream ended");
    }

    async fn serve(
        &mut self,
        view: &mut SentView,
        snapshots: &mut watch::Receiver<Arc<crate::snapshot::Snapshot>>,
    ) -> End {
        loop {
            tokio::select! {
                biased;
                _ = self.replaced.changed() => return End::Replaced,
                _ = self.shutdown.changed() => return End::Gone,
                _ = self.outbound.closed() => return End::Gone,
                message = self.inbound.message() => match message {
                    Ok(Some(message)) => {
                        if self.handle(message, view) {
                            let snapshot = snapshots.borrow().clone();
                            if let Some(update) = view.next_update(&snapshot)
                                && !self.send(update, view).await
                            {
                                return End::Gone;
                            }
                        }
                    }
                    Ok(None) => return End::Gone,
                    Err(status) => {
                        tracing::debug!(node_id = %self.node_id, %status, "sidecar stream error");
                        return End::Gone;
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return End::Gone;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    let Some(update) = view.next_update(&snapshot) else {
                        continue;
                    };
                    if !self.send(update, view).await {
                        return End::Gone;
                    }
                }
            }
        }
    }

    /// Records one message of the sidecar. Returns true when the sidecar must be resynced
    /// with a full Update now.
    fn handle(&mut self, message: SidecarMessage, view: &mut SentView) -> bool {
        let node = self.node_id.as_str();
        match message.kind {
            Some(sidecar_message::Kind::Ack(ack)) => {
                match self
                    .mesh
                    .record_ack(node, self.session, ack.version, &ack.nonce)
                {
                    Answer::Recorded => metrics::counter!(m::ACKS).increment(1),
                    Answer::Stale => {
                        tracing::debug!(node_id = node, version = ack.version, "stale ACK ignored")
                    }
                }
            }
            Some(sidecar_message::Kind::Nack(nack)) => {
                let answer = self.mesh.record_nack(
                    node,
                    self.session,
                    nack.version,
                    &nack.nonce,
                    &nack.error,
                );
                match answer {
                    Answer::Recorded => {
                        metrics::counter!(m::NACKS).increment(1);
                        tracing::warn!(node_id = node, version = nack.version, error = %nack.error, "sidecar refused an update");
                    }
                    Answer::Stale => {
                        tracing::debug!(
                            node_id = node,
                            version = nack.version,
                            "NACK of an earlier update"
                        )
                    }
                }
                // Stale or not, the sidecar lacks what we think it has.
                return view.on_nack();
            }
            Some(sidecar_message::Kind::Health(health)) => {
                self.mesh.set_serving(node, self.session, health.serving);
            }
            Some(sidecar_message::Kind::Hello(_)) => {
                tracing::debug!(node_id = node, "repeated Hello ignored");
            }
            Some(sidecar_message::Kind::EventsReply(reply)) => self.streams.answer(reply),
            Some(sidecar_message::Kind::Certificate(certificate)) => {
                self.mesh.set_certificate(node, self.session, certificate);
            }
            None => {}
        }
        false
    }

    /// Sends an Update with a fresh nonce. Returns false if the sidecar is gone.
    ///
    /// An Update larger than the sidecar decodes is not sent: sent, it would break the stream,
    /// and the sidecar would reconnect and be sent the same one again. It is recorded like a
    /// NACK (`sinewctl status` shows it) and logged; the sidecar keeps its last snapshot and
    /// the stream stays open for the next change.
    async fn send(&mut self, mut update: Update, view: &mut SentView) -> bool {
        let nonce = new_nonce();
        update.nonce = nonce.clone();
        let version = update.version;
        let message = ControlMessage {
            kind: Some(control_message::Kind::Update(update)),
        };
        let size = message.encoded_len();
        if size > self.max_update_bytes {
            let error = too_large(version, size, self.max_update_bytes);
            tracing::error!(node_id = %self.node_id, service = %self.service, version, size, "{error}");
            metrics::counter!(m::UPDATES_TOO_LARGE).increment(1);
            self.mesh
                .record_refused(&self.node_id, self.session, version, &error);
            view.on_not_sent();
            return true;
        }
        self.mesh
            .record_sent(&self.node_id, self.session, version, &nonce);
        let sent = self.outbound.send(Ok(message)).await.is_ok();
        if sent {
            metrics::counter!(m::UPDATES_SENT).increment(1);
        }
        sent
    }
}

/// Why an Update was not sent, for the log and `sinewctl status`.
fn too_large(version: u64, size: usize, limit: usize) -> String {
    format!(
        "update v{version} not sent: {size} bytes, over the {limit} bytes a sidecar accepts; \
         too many endpoints or labels in this sidecar's scope (declare `calls` to narrow it)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_stream_installing_last_is_already_replaced() {
        let streams = Streams::default();
        let (tx, _rx) = mpsc::channel(1);
        let newer = streams.install("web-1", 6, tx.clone(), "");
        let older = streams.install("web-1", 5, tx.clone(), "");
        assert!(
            older.has_changed().is_err(),
            "the older stream ends as replaced"
        );
        assert!(
            newer.has_changed().is_ok(),
            "the newer stream keeps the record"
        );
        let _newest = streams.install("web-1", 7, tx, "");
        assert!(
            newer.has_changed().is_err(),
            "a newer stream replaces an older one"
        );
    }

    #[tokio::test]
    async fn a_shared_events_store_is_asked_through_one_sidecar() {
        let streams = Streams::default();
        let mut receivers = Vec::new();
        let mut watches = Vec::new();
        for (node, store) in [
            ("a-1", ""),
            ("b-1", "nats:nats://n:4222#SINEW_DEAD"),
            ("b-2", "nats:nats://n:4222#SINEW_DEAD"),
            ("c-1", "nats:nats://other:4222#SINEW_DEAD"),
            ("d-1", ""),
        ] {
            let (tx, rx) = mpsc::channel(4);
            watches.push(streams.install(node, 1, tx, store));
            receivers.push((node, rx));
        }
        let (answers, silent) = streams
            .ask_all(&EventsRequest::default(), Duration::from_millis(10))
            .await;
        assert!(answers.is_empty());
        let asked: Vec<&str> = receivers
            .iter_mut()
            .filter_map(|(node, rx)| rx.try_recv().is_ok().then_some(*node))
            .collect();
        assert_eq!(
            asked,
            ["a-1", "b-1", "c-1", "d-1"],
            "b-2 shares b-1's store"
        );
        assert_eq!(silent.len(), 4, "{silent:?}");
    }
}
