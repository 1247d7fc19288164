//! The mesh as sidecars see it: every service with its policy and its endpoints, at one
//! config version.
//!
//! One snapshot is built per change and shared (`Arc`) by every stream task, which only
//! picks its scoped subset and diffs it against what it sent. A service whose resource did
//! not change keeps the same `Arc` from one snapshot to the next, so a stream task detects
//! "unchanged" with a pointer comparison: a change costs one rebuild, not one per sidecar.

use crate::policies::PolicySet;
use crate::registry::Entry;
use sinew_proto::policy::Kind;
use sinew_proto::v1::{Endpoint, ServiceResource, SubscriptionResource};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The SPIFFE identity of a service's instances.
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/svc/{service}")
}

#[derive(Debug, Clone)]
pub struct SnapService {
    pub resource: Arc<ServiceResource>,
    /// The same service without its endpoints: what a scoped sidecar of this service gets
    /// about itself (its policy governs its inbound). Sibling instances coming and going
    /// then do not reach every sibling.
    pub own: Arc<ServiceResource>,
    /// The service's declared dependencies (`spec.calls`), which scope its sidecars' view.
    pub calls: Option<Arc<[String]>>,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: u64,
    /// Every service that has a policy or at least one endpoint.
    pub services: BTreeMap<String, SnapService>,
    /// Every event subscription, by name. Every sidecar receives all of them: any app may
    /// publish to any topic, and its sidecar delivers.
    pub subscriptions: BTreeMap<String, Arc<SubscriptionResource>>,
    /// The services that subscribe to some topic: every sidecar's scope includes them, since
    /// its app may publish events they receive.
    pub subscribers: BTreeSet<String>,
}

impl Snapshot {
    /// Builds the snapshot at `version`, reusing `prev`'s resources that did not change.
    pub fn build<'a>(
        version: u64,
        policies: &PolicySet,
        entries: impl Iterator<Item = &'a Entry>,
        trust_domain: &str,
        prev: &Snapshot,
    ) -> Snapshot {
        let mut endpoints: BTreeMap<&str, Vec<Endpoint>> = BTreeMap::new();
        for entry in entries.filter(|e| e.is_endpoint()) {
            let spec = &entry.spec;
            endpoints.entry(&spec.service).or_default().push(Endpoint {
                node_id: spec.node_id.clone(),
                addr: spec.addr.clone(),
                zone: spec.zone.clone(),
                labels: spec.labels.clone(),
                identity: spiffe_id(trust_domain, &spec.service),
            });
        }
        let mut services: BTreeMap<String, SnapService> = BTreeMap::new();
        let mut names: Vec<&str> = policies.services().map(|(n, _)| n).collect();
        names.extend(endpoints.keys().copied());
        names.sort_unstable();
        names.dedup();
        for name in names {
            let policy = policies.get(Kind::Service, name);
            let mut eps = endpoints.remove(name).unwrap_or_default();
            eps.sort_by(|a, b| a.node_id.cmp(&b.node_id));
            let resource = ServiceResource {
                name: name.to_string(),
                policy_json: policy.map(|p| p.json.clone()).unwrap_or_default(),
                endpoints: eps,
            };
            let resource = match prev.services.get(name) {
                Some(old) if *old.resource == resource => old.resource.clone(),
                _ => Arc::new(resource),
            };
            let own = match prev.services.get(name) {
                Some(old) if old.own.policy_json == resource.policy_json => old.own.clone(),
                _ => Arc::new(ServiceResource {
                    name: name.to_string(),
                    policy_json: resource.policy_json.clone(),
                    endpoints: Vec::new(),
                }),
            };
            let calls = policy
                .and_then(|p| p.document.spec.service())
                .and_then(|s| s.calls.as_ref())
                .map(|c| Arc::from(c.as_slice()));
            services.insert(
                name.to_string(),
                SnapService {
                    resource,
                    own,
                    calls,
                },
            );
        }
        let mut subscriptions = BTreeMap::new();
        let mut subscribers = BTreeSet::new();
        for entry in policies.of_kind(Kind::Subscription) {
            let name = &entry.document.name;
            if let Some(spec) = entry.document.spec.subscription() {
                subscribers.insert(spec.service.clone());
            }
            let resource = SubscriptionResource {
                name: name.clone(),
                spec_json: entry.json.clone(),
            };
            let resource = match prev.subscriptions.get(name) {
                Some(old) if **old == resource => old.clone(),
                _ => Arc::new(resource),
            };
            subscriptions.insert(name.clone(), resource);
        }
        Snapshot {
            version,
            services,
            subscriptions,
            subscribers,
        }
    }

    /// The services a sidecar of `service` receives: its declared `calls` if its policy has
    /// them, otherwise every service. A scoped sidecar also gets its own service's policy
    /// (without endpoints, unless it calls itself): that policy (`allow`) governs its inbound.
    /// Services that subscribe to events are in every scope: the sidecar delivers what its
    /// app publishes.
    pub fn scope<'a>(&'a self, service: &str) -> Vec<&'a Arc<ServiceResource>> {
        match self.services.get(service) {
            Some(me) if me.calls.is_some() => {
                let calls = me.calls.as_deref().unwrap_or_default();
                let called = |name: &str| calls.iter().any(|c| c == name);
                let mut view: Vec<&Arc<ServiceResource>> = calls
                    .iter()
                    .map(String::as_str)
                    .chain(
                        self.subscribers
                            .iter()
                            .map(String::as_str)
                            .filter(|s| !called(s)),
                    )
                    .filter_map(|c| self.services.get(c))
                    .map(|s| &s.resource)
                    .collect();
                if !called(service) && !self.subscribers.contains(service) {
                    view.push(&me.own);
                }
                view
            }
            _ => self.services.values().map(|s| &s.resource).collect(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::registry::{InstanceSpec, Registry};
    use sinew_proto::policy::parse_documents;
    use std::collections::HashMap;
    use std::time::Duration;

    pub(crate) fn policies(yaml: &str) -> PolicySet {
        let mut set = PolicySet::default();
        set.commit(&set.plan_apply(parse_documents(yaml).unwrap()));
        set
    }

    pub(crate) fn register(r: &mut Registry, node: &str, service: &str) -> u64 {
        r.register(
            InstanceSpec {
                node_id: node.into(),
                service: service.into(),
                addr: format!("{node}:4143"),
                zone: "z1".into(),
                labels: HashMap::new(),
            },
            0,
            0,
        )
        .session
    }

    #[test]
    fn services_with_policy_or_endpoints_sorted_endpoints() {
        let p = policies("kind: Service\nname: orders\nspec: {timeout: 2s}\n");
        let mut r = Registry::new(Duration::from_secs(1));
        register(&mut r, "w2", "web");
        register(&mut r, "w1", "web");
        let s = Snapshot::build(3, &p, r.entries(), "sinew.local", &Snapshot::default());
        let names: Vec<&String> = s.services.keys().collect();
        assert_eq!(names, ["orders", "web"]);
        let orders = &s.services["orders"].resource;
        assert!(orders.policy_json.contains("\"timeout\":\"2s\""));
        assert!(orders.endpoints.is_empty());
        let web = &s.services["web"].resource;
        assert_eq!(web.policy_json, "");
        let nodes: Vec<&str> = web.endpoints.iter().map(|e| e.node_id.as_str()).collect();
        assert_eq!(nodes, ["w1", "w2"]);
        assert_eq!(web.endpoints[0].identity, "spiffe://sinew.local/svc/web");
        assert_eq!(web.endpoints[0].addr, "w1:4143");
    }

    #[test]
    fn unchanged_services_keep_their_arc() {
        let p = policies("kind: Service\nname: orders\n");
        let mut r = Registry::new(Duration::from_secs(1));
        register(&mut r, "w1", "web");
        let s1 = Snapshot::build(1, &p, r.entries(), "td", &Snapshot::default());
        register(&mut r, "w2", "web");
        let s2 = Snapshot::build(2, &p, r.entries(), "td", &s1);
        assert!(Arc::ptr_eq(
            &s1.services["orders"].resource,
            &s2.services["orders"].resource
        ));
        assert!(!Arc::ptr_eq(
            &s1.services["web"].resource,
            &s2.services["web"].resource
        ));
    }

    #[test]
    fn calls_scope_the_view() {
        let p = policies(
            "kind: Service\nname: web\nspec: {calls: [orders, ghost]}\n---\nkind: Service\nname: orders\n---\nkind: Service\nname: billing\n",
        );
        let r = Registry::new(Duration::from_secs(1));
        let s = Snapshot::build(1, &p, r.entries(), "td", &Snapshot::default());
        let web: Vec<&str> = s.scope("web").iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            web,
            ["orders", "web"],
            "declared dependencies that exist, and itself"
        );
        let billing: Vec<&str> = s.scope("billing").iter().map(|r| r.name.as_str()).collect();
        assert_eq!(billing, ["billing", "orders", "web"]);
        assert_eq!(s.scope("unknown").len(), 3);
    }

    #[test]
    fn non_serving_instances_are_not_endpoints() {
        let p = PolicySet::default();
        let mut r = Registry::new(Duration::from_secs(1));
        let s = register(&mut r, "w1", "web");
        r.set_serving("w1", s, false);
        let snap = Snapshot::build(1, &p, r.entries(), "td", &Snapshot::default());
        assert!(snap.services.is_empty());
    }
}
