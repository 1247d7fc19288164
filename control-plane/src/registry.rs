//! The registry of sidecar instances and their leases.
//!
//! An instance is registered by the Hello of its stream and stays registered while the stream
//! lives, plus a grace period after it ends (a lease), so a sidecar that reconnects after a
//! blip, or a control plane restart, does not make its instance flap out of everyone's
//! endpoint sets. A record outlives its lease for a while (`Gone`) so `sinewctl status` can
//! still show what happened to it.
//!
//! Plain code: every call that depends on time takes `now` (unix ms).

use crate::sync::SyncTracker;
use sinew_proto::v1::CertificateStatus;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// How long a record is kept for `status` after its lease ended.
pub const GONE_RETENTION: Duration = Duration::from_secs(600);

/// What a Hello says about an instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceSpec {
    pub node_id: String,
    pub service: String,
    /// Where other sidecars reach this one (QUIC, host:port).
    pub addr: String,
    pub zone: String,
    pub labels: HashMap<String, String>,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Its stream is open.
    Connected,
    /// Its stream ended; it stays registered until `until_ms`.
    Grace { until_ms: i64 },
    /// Its lease ended at `since_ms`; kept only for status.
    Gone { since_ms: i64 },
}

/// One sidecar: its instance, its lease, and its push bookkeeping.
#[derive(Debug, Clone)]
pub struct Entry {
    pub spec: InstanceSpec,
    /// Which stream owns the record; a newer stream with the same node id replaces it.
    pub session: u64,
    pub liveness: Liveness,
    /// The local app's health as last reported (true until told otherwise).
    pub serving: bool,
    pub connected_since_ms: i64,
    pub sync: SyncTracker,
    /// The certificate the sidecar last reported on this stream.
    pub certificate: Option<CertificateStatus>,
}

impl Entry {
    /// Registered: connected, or disconnected with its lease running.
    pub fn is_live(&self) -> bool {
        !matches!(self.liveness, Liveness::Gone { .. })
    }

    /// In its service's endpoint set.
    pub fn is_endpoint(&self) -> bool {
        self.is_live() && self.serving
    }

    pub fn is_connected(&self) -> bool {
        self.liveness == Liveness::Connected
    }

    /// What other sidecars see of this instance, when it is an endpoint.
    fn visible(&self) -> Option<&InstanceSpec> {
        self.is_endpoint().then_some(&self.spec)
    }
}

/// The result of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    pub session: u64,
    /// Whether some endpoint set changed.
    pub endpoints_changed: bool,
}

#[derive(Debug)]
pub struct Registry {
    entries: BTreeMap<String, Entry>,
    next_session: u64,
    grace_ms: i64,
    retain_ms: i64,
}

impl Registry {
    pub fn new(grace: Duration) -> Self {
        Registry {
            entries: BTreeMap::new(),
            next_session: 1,
            grace_ms: duration_ms(grace),
            retain_ms: duration_ms(GONE_RETENTION),
        }
    }

    /// Registers (or re-registers) an instance for a new stream. A previous stream with the
    /// same node id loses the record: its later calls are ignored.
    pub fn register(&mut self, spec: InstanceSpec, applied_version: u64, now: i64) -> Registered {
        let session = self.next_session;
        self.next_session += 1;
        let entry = Entry {
            spec,
            session,
            liveness: Liveness::Connected,
            serving: true,
            connected_since_ms: now,
            sync: SyncTracker::new(applied_version),
            certificate: None,
        };
        let before = self.entries.get(&entry.spec.node_id);
        let endpoints_changed = before.and_then(Entry::visible) != entry.visible();
        self.entries.insert(entry.spec.node_id.clone(), entry);
        Registered {
            session,
            endpoints_changed,
        }
    }

    /// An instance known from before a restart: registered, its lease running from `now`,
    /// until its sidecar reconnects (and takes the record over) or the lease ends.
    pub fn restore(&mut self, spec: InstanceSpec, now: i64) {
        let session = self.next_session;
        self.next_session += 1;
        let entry = Entry {
            spec,
            session,
            liveness: Liveness::Grace {
                until_ms: now.saturating_add(self.grace_ms),
            },
            serving: true,
            connected_since_ms: 0,
            sync: SyncTracker::new(0),
            certificate: None,
        };
        self.entries.insert(entry.spec.node_id.clone(), entry);
    }

    /// The specs of every live (registered) instance, by node id.
    pub fn live_specs(&self) -> impl Iterator<Item = &InstanceSpec> {
        self.entries
            .values()
            .filter(|e| e.is_live())
            .map(|e| &e.spec)
    }

    /// The stream `session` ended: its lease starts running. Returns false if the record
    /// belongs to another stream by now.
    pub fn disconnect(&mut self, node_id: &str, session: u64, now: i64) -> bool {
        let grace_ms = self.grace_ms;
        match self.owned_mut(node_id, session) {
            Some(entry) if entry.is_connected() => {
                entry.liveness = Liveness::Grace {
                    until_ms: now.saturating_add(grace_ms),
                };
                true
            }
            _ => false,
        }
    }

    /// Records the app's health. Returns whether an endpoint set changed.
    pub fn set_serving(&mut self, node_id: &str, session: u64, serving: bool) -> bool {
        match self.owned_mut(node_id, session) {
            Some(entry) if entry.serving != serving => {
                entry.serving = serving;
                entry.is_live()
            }
            _ => false,
        }
    }

    /// Records the certificate the sidecar of `session` presents now.
    pub fn set_certificate(&mut self, node_id: &str, session: u64, status: CertificateStatus) {
        if let Some(entry) = self.owned_mut(node_id, session) {
            entry.certificate = Some(status);
        }
    }

    /// The push bookkeeping of the stream `session`, if it still owns the record.
    pub fn tracker_mut(&mut self, node_id: &str, session: u64) -> Option<&mut SyncTracker> {
        self.owned_mut(node_id, session).map(|e| &mut e.sync)
    }

    /// Ends the leases that ran out and forgets records kept long enough. Returns whether an
    /// endpoint set changed.
    pub fn expire(&mut self, now: i64) -> bool {
        let mut changed = false;
        for entry in self.entries.values_mut() {
            match entry.liveness {
                Liveness::Grace { until_ms } if until_ms <= now => {
                    changed |= entry.serving;
                    entry.liveness = Liveness::Gone { since_ms: until_ms };
                }
                _ => {}
            }
        }
        let retain_ms = self.retain_ms;
        self.entries.retain(|_, e| match e.liveness {
            Liveness::Gone { since_ms } => since_ms.saturating_add(retain_ms) > now,
            _ => true,
        });
        changed
    }

    /// When [`Registry::expire`] next has something to do.
    pub fn next_deadline(&self) -> Option<i64> {
        self.entries
            .values()
            .filter_map(|e| match e.liveness {
                Liveness::Connected => None,
                Liveness::Grace { until_ms } => Some(until_ms),
                Liveness::Gone { since_ms } => Some(since_ms.saturating_add(self.retain_ms)),
            })
            .min()
    }

    /// Every record, by node id.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn connected_count(&self) -> usize {
        self.entries.values().filter(|e| e.is_connected()).count()
    }

    pub fn live_count(&self) -> usize {
        self.entries.values().filter(|e| e.is_live()).count()
    }

    fn owned_mut(&mut self, node_id: &str, session: u64) -> Option<&mut Entry> {
        self.entries
            .get_mut(node_id)
            .filter(|e| e.session == session)
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(node: &str, service: &str) -> InstanceSpec {
        InstanceSpec {
            node_id: node.into(),
            service: service.into(),
            addr: format!("{node}:4143"),
            zone: String::new(),
            labels: HashMap::new(),
        }
    }

    fn registry() -> Registry {
        Registry::new(Duration::from_millis(300))
    }

    #[test]
    fn a_disconnected_instance_stays_for_the_grace_then_leaves() {
        let mut r = registry();
        let reg = r.register(spec("a", "orders"), 0, 1_000);
        assert!(reg.endpoints_changed);
        assert!(r.disconnect("a", reg.session, 2_000));
        assert_eq!(r.next_deadline(), Some(2_300));
        assert!(!r.expire(2_299));
        let e = r.entries().next().unwrap();
        assert!(e.is_endpoint() && !e.is_connected());
        assert!(r.expire(2_300), "lease ended: endpoint set changed");
        assert_eq!(r.live_count(), 0);
        assert_eq!(r.entries().count(), 1, "kept for status");
        let forget_at = 2_300 + duration_ms(GONE_RETENTION);
        assert_eq!(r.next_deadline(), Some(forget_at));
        assert!(!r.expire(forget_at));
        assert_eq!(r.entries().count(), 0);
    }

    #[test]
    fn a_new_stream_with_the_same_node_id_replaces_the_old_one() {
        let mut r = registry();
        let old = r.register(spec("a", "orders"), 0, 1_000);
        let new = r.register(spec("a", "orders"), 5, 1_500);
        assert!(!new.endpoints_changed, "same instance, same endpoint");
        assert!(
            !r.disconnect("a", old.session, 1_600),
            "old stream no longer owns it"
        );
        assert!(r.tracker_mut("a", old.session).is_none());
        assert!(!r.set_serving("a", old.session, false));
        let e = r.entries().next().unwrap();
        assert!(e.is_connected());
        assert_eq!(e.connected_since_ms, 1_500);
        assert_eq!(e.sync.applied_version, 5);
    }

    #[test]
    fn reconnect_during_grace_keeps_the_endpoint() {
        let mut r = registry();
        let s = r.register(spec("a", "orders"), 0, 0).session;
        r.disconnect("a", s, 10);
        let again = r.register(spec("a", "orders"), 0, 100);
        assert!(!again.endpoints_changed);
        assert!(!r.expire(1_000));
        assert_eq!(r.connected_count(), 1);
    }

    #[test]
    fn moving_address_changes_the_endpoint_set() {
        let mut r = registry();
        r.register(spec("a", "orders"), 0, 0);
        let mut moved = spec("a", "orders");
        moved.addr = "10.0.0.9:4143".into();
        assert!(r.register(moved, 0, 1).endpoints_changed);
    }

    #[test]
    fn health_moves_an_instance_in_and_out_of_its_endpoint_set() {
        let mut r = registry();
        let s = r.register(spec("a", "orders"), 0, 0).session;
        assert!(r.set_serving("a", s, false));
        assert!(!r.set_serving("a", s, false), "no change");
        assert!(!r.entries().next().unwrap().is_endpoint());
        assert!(r.set_serving("a", s, true));
        // A lease that ends on a non-serving instance changes no endpoint set.
        r.set_serving("a", s, false);
        r.disconnect("a", s, 0);
        assert!(!r.expire(10_000));
    }
}
