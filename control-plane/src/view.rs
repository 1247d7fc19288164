//! What one sidecar was sent, and what it must be sent next.
//!
//! The first Update of a stream is the whole scoped view (`full`); after that only the
//! services that were added or changed, and the names that left the view. When a change in
//! the mesh does not touch a sidecar's view, it is sent nothing. After a NACK the sidecar
//! kept an older snapshot than the one we assumed, so the next Update is full again.

use crate::snapshot::Snapshot;
use sinew_proto::v1::{ServiceResource, SubscriptionResource, Update};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The per-stream diff state.
#[derive(Debug)]
pub struct SentView {
    service: String,
    sent: BTreeMap<String, Arc<ServiceResource>>,
    sent_subscriptions: BTreeMap<String, Arc<SubscriptionResource>>,
    sent_version: u64,
    needs_full: bool,
    /// Whether the last Update sent was full: a NACK of a full Update is not answered with
    /// another full one (it would be refused again), only with the next change.
    last_full: bool,
}

impl SentView {
    /// A new stream of a sidecar of `service`.
    pub fn new(service: &str) -> Self {
        SentView {
            service: service.to_string(),
            sent: BTreeMap::new(),
            sent_subscriptions: BTreeMap::new(),
            sent_version: 0,
            needs_full: true,
            last_full: false,
        }
    }

    /// The next Update for `snapshot` (with an empty nonce for the caller to fill), or `None`
    /// if the sidecar's view did not change.
    pub fn next_update(&mut self, snapshot: &Snapshot) -> Option<Update> {
        let view = snapshot.scope(&self.service);
        let version = snapshot.version.max(self.sent_version);
        let full = self.needs_full;
        let mut changed = Vec::new();
        let mut next = BTreeMap::new();
        for resource in view {
            let same = self
                .sent
                .get(&resource.name)
                .is_some_and(|old| Arc::ptr_eq(old, resource) || **old == **resource);
            if full || !same {
                changed.push((**resource).clone());
            }
            next.insert(resource.name.clone(), resource.clone());
        }
        let removed: Vec<String> = if full {
            Vec::new()
        } else {
            self.sent
                .keys()
                .filter(|name| !next.contains_key(*name))
                .cloned()
                .collect()
        };
        self.sent = next;
        let (subscriptions, removed_subscriptions) =
            diff(&self.sent_subscriptions, &snapshot.subscriptions, full);
        self.sent_subscriptions = snapshot.subscriptions.clone();
        if !full
            && changed.is_empty()
            && removed.is_empty()
            && subscriptions.is_empty()
            && removed_subscriptions.is_empty()
        {
            return None;
        }
        let base_version = if full { 0 } else { self.sent_version };
        self.needs_full = false;
        self.last_full = full;
        self.sent_version = version;
        Some(Update {
            version,
            nonce: String::new(),
            full,
            services: changed,
            removed_services: removed,
            base_version,
            subscriptions,
            removed_subscriptions,
        })
    }

    /// The sidecar refused an Update (this one or an earlier one still in flight), so it
    /// holds an older snapshot than we assumed. Returns true when a full Update should go at
    /// once: the refused one was a delta, which may have failed only for lack of its base.
    pub fn on_nack(&mut self) -> bool {
        self.needs_full = true;
        !self.last_full
    }

    /// The last Update was not sent after all (too large): the sidecar holds an older
    /// snapshot, so the next change goes as a full Update, which may fit by then.
    pub fn on_not_sent(&mut self) {
        self.needs_full = true;
    }

    pub fn sent_version(&self) -> u64 {
        self.sent_version
    }
}

/// What changed from `sent` to `now`: the resources to send (all of them when `full`), and
/// the names that left.
fn diff<T: PartialEq + Clone>(
    sent: &BTreeMap<String, Arc<T>>,
    now: &BTreeMap<String, Arc<T>>,
    full: bool,
) -> (Vec<T>, Vec<String>) {
    let changed = now
        .iter()
        .filter(|(name, r)| {
            full || !sent
                .get(*name)
                .is_some_and(|old| Arc::ptr_eq(old, r) || **old == ***r)
        })
        .map(|(_, r)| (**r).clone())
        .collect();
    let removed = if full {
        Vec::new()
    } else {
        sent.keys()
            .filter(|name| !now.contains_key(*name))
            .cloned()
            .collect()
    };
    (changed, removed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policies::PolicySet;
    use crate::registry::Registry;
    use crate::snapshot::tests::{policies, register};
    use std::time::Duration;

    fn names(u: &Update) -> Vec<&str> {
        u.services.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn deltas_name_their_base_and_a_nack_of_a_delta_resyncs_at_once() {
        let p = policies("kind: Service\nname: orders\n");
        let mut r = Registry::new(Duration::from_secs(1));
        register(&mut r, "w1", "web");
        let s1 = Snapshot::build(1, &p, r.entries(), "td", &Snapshot::default());
        let mut view = SentView::new("web");
        let u1 = view.next_update(&s1).unwrap();
        assert_eq!((u1.full, u1.base_version), (true, 0));
        // A NACK of the full view waits for the next change: resending it would fail again.
        assert!(!view.on_nack());
        register(&mut r, "w2", "web");
        let s2 = Snapshot::build(2, &p, r.entries(), "td", &s1);
        let u2 = view.next_update(&s2).unwrap();
        assert!(u2.full, "after a NACK the next update is full");
        register(&mut r, "w3", "web");
        let s3 = Snapshot::build(3, &p, r.entries(), "td", &s2);
        let u3 = view.next_update(&s3).unwrap();
        assert_eq!((u3.full, u3.base_version), (false, 2));
        // A NACK of a delta (or of an earlier one still in flight) resyncs now, in full,
        // even though nothing changed since.
        assert!(view.on_nack());
        let again = view.next_update(&s3).unwrap();
        assert!(again.full);
        assert_eq!(again.version, 3);
    }

    #[test]
    fn full_first_then_deltas_then_nothing() {
        let p = policies("kind: Service\nname: orders\n");
        let mut r = Registry::new(Duration::from_secs(1));
        register(&mut r, "w1", "web");
        let s1 = Snapshot::build(1, &p, r.entries(), "td", &Snapshot::default());
        let mut view = SentView::new("web");

        let u = view.next_update(&s1).unwrap();
        assert!(u.full);
        assert_eq!(names(&u), ["orders", "web"]);
        assert_eq!(u.version, 1);

        register(&mut r, "w2", "web");
        let s2 = Snapshot::build(2, &p, r.entries(), "td", &s1);
        let u = view.next_update(&s2).unwrap();
        assert!(!u.full);
        assert_eq!(names(&u), ["web"]);
        assert_eq!(u.services[0].endpoints.len(), 2);

        let s3 = Snapshot::build(3, &p, r.entries(), "td", &s2);
        assert!(view.next_update(&s3).is_none(), "nothing changed");
        assert_eq!(view.sent_version(), 2);
    }

    #[test]
    fn removed_services_are_named() {
        let p = policies("kind: Service\nname: orders\n");
        let r = Registry::new(Duration::from_secs(1));
        let s1 = Snapshot::build(1, &p, r.entries(), "td", &Snapshot::default());
        let mut view = SentView::new("web");
        view.next_update(&s1);
        let s2 = Snapshot::build(2, &PolicySet::default(), r.entries(), "td", &s1);
        let u = view.next_update(&s2).unwrap();
        assert!(!u.full && u.services.is_empty());
        assert_eq!(u.removed_services, ["orders"]);
    }

    #[test]
    fn scope_changes_add_and_remove() {
        let mut r = Registry::new(Duration::from_secs(1));
        register(&mut r, "o1", "orders");
        register(&mut r, "b1", "billing");
        let p1 = policies("kind: Service\nname: web\nspec: {calls: [orders]}\n");
        let s1 = Snapshot::build(1, &p1, r.entries(), "td", &Snapshot::default());
        let mut view = SentView::new("web");
        assert_eq!(names(&view.next_update(&s1).unwrap()), ["orders", "web"]);
        let p2 = policies("kind: Service\nname: web\nspec: {calls: [billing]}\n");
        let s2 = Snapshot::build(2, &p2, r.entries(), "td", &s1);
        let u = view.next_update(&s2).unwrap();
        // web itself changed too: its policy (the calls list) is part of its resource.
        assert_eq!(names(&u), ["billing", "web"]);
        assert_eq!(u.removed_services, ["orders"]);
    }

    #[test]
    fn after_a_nack_the_next_update_is_full() {
        let p = policies("kind: Service\nname: orders\n---\nkind: Service\nname: web\n");
        let r = Registry::new(Duration::from_secs(1));
        let s1 = Snapshot::build(1, &p, r.entries(), "td", &Snapshot::default());
        let mut view = SentView::new("web");
        view.next_update(&s1);
        view.on_nack();
        let p2 = policies(
            "kind: Service\nname: orders\nspec: {timeout: 1s}\n---\nkind: Service\nname: web\n",
        );
        let s2 = Snapshot::build(2, &p2, r.entries(), "td", &s1);
        let u = view.next_update(&s2).unwrap();
        assert!(u.full);
        assert_eq!(names(&u), ["orders", "web"]);
    }

    #[test]
    fn versions_do_not_go_backwards() {
        let p = policies("kind: Service\nname: orders\n");
        let r = Registry::new(Duration::from_secs(1));
        let s5 = Snapshot::build(5, &p, r.entries(), "td", &Snapshot::default());
        let mut view = SentView::new("web");
        view.next_update(&s5);
        let p2 = policies("kind: Service\nname: orders\nspec: {timeout: 1s}\n");
        let s4 = Snapshot::build(4, &p2, r.entries(), "td", &s5);
        assert_eq!(view.next_update(&s4).unwrap().version, 5);
    }
}
