//! The applied configuration: every service this sidecar may call, with its policy and its
//! endpoints. Readers take it with one lock-free load (`ArcSwap`); an Update builds a new
//! snapshot beside the old one and swaps it in whole, or is refused and changes nothing.

use crate::balance::p2c;
use crate::endpoint::{EndpointState, ServiceState, Unsettled};
use crate::resilience::{Reach, State};
use crate::transport::Target;
use prost::Message;
use sinew_proto::policy::{ServiceSpec, SubscriptionSpec, validate_name};
use sinew_proto::v1::{ServiceResource, SubscriptionResource, Update};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Snapshot {
    /// 0 until the first Update (or the disk cache) is applied.
    pub version: u64,
    pub services: HashMap<String, Arc<Service>>,
    /// Every event subscription of the mesh, by name.
    pub subscriptions: HashMap<String, Arc<Subscription>>,
}

/// `kind: Subscription`: a service receiving a topic's events.
#[derive(Debug)]
pub struct Subscription {
    pub name: String,
    pub spec: SubscriptionSpec,
    resource: SubscriptionResource,
}

impl Subscription {
    /// The spec's canonical JSON as the control plane sent it: equal JSON, equal spec.
    pub fn spec_json(&self) -> &str {
        &self.resource.spec_json
    }
}

#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub policy: ServiceSpec,
    pub endpoints: Vec<Endpoint>,
    /// The retry budget, carried over from the previous snapshot.
    pub state: Arc<ServiceState>,
    /// How many endpoints are not plainly ready; carried over with the endpoints' states.
    unsettled: Arc<Unsettled>,
    /// The resource as received, kept for the disk cache and `/config`.
    resource: ServiceResource,
}

#[derive(Debug, Clone)]
pub struct Endpoint {
    pub node_id: String,
    pub zone: String,
    pub target: Target,
    /// Load, latency and health, carried over from the previous snapshot.
    pub state: Arc<EndpointState>,
}

impl Service {
    /// Picks the endpoint for one try. An endpoint whose ejection ran out goes first: one
    /// probe request decides whether it is back; so does one whose last dial failed, once
    /// its redial wait is over. Otherwise power of two choices by cost (peak-EWMA latency ×
    /// requests in flight) over the endpoints that are not ejected, not known down, and that
    /// this request has not tried yet. When every endpoint left is down, it tries those
    /// anyway (the record may be stale). When more than `max_ejection_percent` are ejected,
    /// or all are, it balances across all of them (panic mode): an ejection must never turn
    /// a degraded service into an unavailable one. `None` only when there is no endpoint.
    ///
    /// The first try while every endpoint is ready and reachable (the common case) takes
    /// two random draws and two cost reads: no scan, no allocation.
    pub fn pick(&self, now: Instant, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        if tried.is_empty() && self.unsettled.none() {
            return p2c::pick(
                n,
                |i| self.endpoints[i].state.cost(now),
                |m| fastrand::usize(..m),
            );
        }
        self.pick_by_scan(now, tried)
    }

    /// [`Service::pick`] when some endpoint is ejected, down or probing, or for a retry:
    /// every endpoint's state is read.
    fn pick_by_scan(&self, now: Instant, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        let mut ready = Vec::with_capacity(n);
        let mut down = Vec::new();
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            match endpoint.state.state(now) {
                State::Probe => return Some(i),
                State::Ready => match endpoint.state.reach(now) {
                    Reach::Reachable => ready.push(i),
                    Reach::Redial if !tried.contains(&i) => return Some(i),
                    Reach::Redial | Reach::Down => down.push(i),
                },
                _ => {}
            }
        }
        let ejected = n - ready.len() - down.len();
        let allowed = n * self.policy.outlier.max_ejection_percent as usize / 100;
        let mut candidates = if ejected == n || ejected > allowed {
            metrics::counter!("sinew_balancer_panic_total", "peer" => self.name.clone())
                .increment(1);
            (0..n).collect()
        } else if ready.is_empty() {
            down
        } else {
            ready
        };
        let untried: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|i| !tried.contains(i))
            .collect();
        if !untried.is_empty() {
            candidates = untried;
        }
        p2c::pick(
            candidates.len(),
            |k| self.endpoints[candidates[k]].state.cost(now),
            |m| fastrand::usize(..m),
        )
        .map(|k| candidates[k])
    }

    /// Builds a service from its resource, taking over what `previous` learned.
    fn from_resource(
        resource: ServiceResource,
        previous: Option<&Service>,
        now: Instant,
    ) -> Result<Service, String> {
        let name = resource.name.clone();
        validate_name(&name).map_err(|e| format!("service name: {e}"))?;
        let policy = ServiceSpec::from_json(&resource.policy_json)
            .map_err(|e| format!("service {name}: {}: {}", e.path, e.reason))?;
        let unsettled = previous.map_or_else(Arc::default, |p| p.unsettled.clone());
        let mut endpoints = Vec::with_capacity(resource.endpoints.len());
        for (i, ep) in resource.endpoints.iter().enumerate() {
            let addr: SocketAddr = ep.addr.parse().map_err(|_| {
                format!(
                    "service {name}: endpoints[{i}].addr: `{}` is not an ip:port",
                    ep.addr
                )
            })?;
            if !ep.identity.starts_with("spiffe://") {
                return Err(format!(
                    "service {name}: endpoints[{i}].identity: `{}` is not a spiffe:// id",
                    ep.identity
                ));
            }
            let state = previous
                .and_then(|p| {
                    p.endpoints
                        .iter()
                        .find(|e| e.target.addr == addr && e.target.identity == ep.identity)
                })
                .map_or_else(
                    || Arc::new(EndpointState::new(now, unsettled.clone())),
                    |e| e.state.clone(),
                );
            endpoints.push(Endpoint {
                node_id: ep.node_id.clone(),
                zone: ep.zone.clone(),
                target: Target {
                    addr,
                    identity: ep.identity.clone(),
                    connect_timeout: policy.connect_timeout,
                },
                state,
            });
        }
        let state = previous
            .map(|p| p.state.clone())
            .filter(|s| s.fits(&policy.retries.budget))
            .unwrap_or_else(|| {
                Arc::new(ServiceState::new(
                    &policy.retries.budget,
                    policy.max_concurrent,
                    now,
                ))
            });
        // The in-flight count survives a policy change; only the maximum moves.
        state.limit.set_max(policy.max_concurrent as usize);
        Ok(Service {
            name,
            policy,
            endpoints,
            state,
            unsettled,
            resource,
        })
    }
}

impl Snapshot {
    /// Builds the snapshot that `update` leads to, or says why it cannot be applied.
    pub fn apply(&self, update: &Update) -> Result<Snapshot, String> {
        let now = Instant::now();
        if update.version == 0 {
            return Err("version 0 is reserved for `nothing applied`".into());
        }
        if !update.full && update.base_version != self.version {
            return Err(format!(
                "delta {} applies on top of version {}, but version {} is applied; send it in full",
                update.version, update.base_version, self.version
            ));
        }
        let mut services = if update.full {
            HashMap::new()
        } else {
            self.services.clone()
        };
        for name in &update.removed_services {
            services.remove(name);
        }
        for resource in &update.services {
            let service = Service::from_resource(
                resource.clone(),
                self.services.get(&resource.name).map(|s| &**s),
                now,
            )?;
            services.insert(service.name.clone(), Arc::new(service));
        }
        let mut subscriptions = if update.full {
            HashMap::new()
        } else {
            self.subscriptions.clone()
        };
        for name in &update.removed_subscriptions {
            subscriptions.remove(name);
        }
        for resource in &update.subscriptions {
            let spec = SubscriptionSpec::from_json(&resource.spec_json)
                .map_err(|e| format!("subscription `{}`: {e}", resource.name))?;
            let subscription = Subscription {
                name: resource.name.clone(),
                spec,
                resource: resource.clone(),
            };
            subscriptions.insert(resource.name.clone(), Arc::new(subscription));
        }
        Ok(Snapshot {
            version: update.version,
            services,
            subscriptions,
        })
    }

    /// The subscriptions to `topic`, by name.
    pub fn subscribers(&self, topic: &str) -> Vec<Arc<Subscription>> {
        let mut subs: Vec<Arc<Subscription>> = self
            .subscriptions
            .values()
            .filter(|s| s.spec.topic == topic)
            .cloned()
            .collect();
        subs.sort_by(|a, b| a.name.cmp(&b.name));
        subs
    }

    /// The whole snapshot as a full Update, the form the disk cache keeps.
    pub fn to_update(&self) -> Update {
        let mut services: Vec<ServiceResource> =
            self.services.values().map(|s| s.resource.clone()).collect();
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let mut subscriptions: Vec<SubscriptionResource> = self
            .subscriptions
            .values()
            .map(|s| s.resource.clone())
            .collect();
        subscriptions.sort_by(|a, b| a.name.cmp(&b.name));
        Update {
            version: self.version,
            nonce: String::new(),
            full: true,
            services,
            removed_services: Vec::new(),
            base_version: 0,
            subscriptions,
            removed_subscriptions: Vec::new(),
        }
    }

    /// Writes the snapshot to `path` atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.to_update().encode_to_vec())?;
        std::fs::rename(tmp, path)
    }

    /// Reads a snapshot that [`Snapshot::save`] wrote. `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Snapshot>, String> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let update = Update::decode(bytes.as_slice())
            .map_err(|e| format!("{}: not a snapshot: {e}", path.display()))?;
        Snapshot::default().apply(&update).map(Some)
    }

    /// The snapshot as the admin endpoint `/config` shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let mut names: Vec<&String> = self.services.keys().collect();
        names.sort();
        let services: serde_json::Map<String, serde_json::Value> = names
            .into_iter()
            .filter_map(|name| self.services.get(name).map(|s| (name.clone(), s.to_json())))
            .collect();
        let mut subscriptions: Vec<&Arc<Subscription>> = self.subscriptions.values().collect();
        subscriptions.sort_by(|a, b| a.name.cmp(&b.name));
        let subscriptions: serde_json::Map<String, serde_json::Value> = subscriptions
            .into_iter()
            .map(|s| {
                let spec = serde_json::to_value(&s.spec).unwrap_or_default();
                (s.name.clone(), spec)
            })
            .collect();
        serde_json::json!({
            "version": self.version,
            "services": services,
            "subscriptions": subscriptions,
        })
    }
}

impl Service {
    fn to_json(&self) -> serde_json::Value {
        let endpoints: Vec<serde_json::Value> = self
            .endpoints
            .iter()
            .map(|e| {
                serde_json::json!({
                    "node_id": e.node_id,
                    "addr": e.target.addr.to_string(),
                    "identity": e.target.identity,
                    "zone": e.zone,
                })
            })
            .collect();
        serde_json::json!({ "policy": self.policy, "endpoints": endpoints })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sinew_proto::v1::Endpoint as ProtoEndpoint;

    fn resource(name: &str, addrs: &[&str]) -> ServiceResource {
        ServiceResource {
            name: name.into(),
            policy_json: String::new(),
            endpoints: addrs
                .iter()
                .enumerate()
                .map(|(i, addr)| ProtoEndpoint {
                    node_id: format!("{name}-{i}"),
                    addr: addr.to_string(),
                    identity: format!("spiffe://sinew.local/svc/{name}"),
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn update(
        version: u64,
        full: bool,
        services: Vec<ServiceResource>,
        removed: &[&str],
    ) -> Update {
        Update {
            version,
            nonce: "n".into(),
            full,
            services,
            removed_services: removed.iter().map(|s| s.to_string()).collect(),
            base_version: if full { 0 } else { version - 1 },
            ..Update::default()
        }
    }

    #[test]
    fn full_then_delta() {
        let s1 = Snapshot::default()
            .apply(&update(
                1,
                true,
                vec![resource("orders", &["127.0.0.1:1"]), resource("web", &[])],
                &[],
            ))
            .unwrap();
        assert_eq!(s1.services.len(), 2);
        let s2 = s1
            .apply(&update(
                2,
                false,
                vec![resource("orders", &["127.0.0.1:1", "127.0.0.1:2"])],
                &["web"],
            ))
            .unwrap();
        assert_eq!(s2.version, 2);
        assert_eq!(s2.services["orders"].endpoints.len(), 2);
        assert!(!s2.services.contains_key("web"));
        let s3 = s2
            .apply(&update(3, true, vec![resource("billing", &[])], &[]))
            .unwrap();
        assert_eq!(s3.services.keys().collect::<Vec<_>>(), ["billing"]);
    }

    #[test]
    fn bad_updates_are_refused_with_the_reason() {
        let base = Snapshot::default();
        let err = base
            .apply(&update(
                1,
                true,
                vec![resource("orders", &["nowhere"])],
                &[],
            ))
            .unwrap_err();
        assert!(err.contains("endpoints[0].addr"), "{err}");
        let mut bad_policy = resource("orders", &[]);
        bad_policy.policy_json = r#"{"timeout":"1s","hedging":true}"#.into();
        let err = base
            .apply(&update(1, true, vec![bad_policy], &[]))
            .unwrap_err();
        assert!(err.contains("unknown field `hedging`"), "{err}");
        assert!(base.apply(&update(0, true, vec![], &[])).is_err());
        // A delta whose base is not what is applied (an earlier delta was missed).
        let v1 = base
            .apply(&update(1, true, vec![resource("orders", &[])], &[]))
            .unwrap();
        let err = v1
            .apply(&update(3, false, vec![], &["orders"]))
            .unwrap_err();
        assert!(
            err.contains("on top of version 2, but version 1 is applied"),
            "{err}"
        );
        assert!(
            base.apply(&update(1, true, vec![resource("Bad", &[])], &[]))
                .is_err()
        );
    }

    /// Version 1: the service `orders` on 127.0.0.1:1 and :2.
    fn orders_on_two_endpoints() -> Snapshot {
        Snapshot::default()
            .apply(&update(
                1,
                true,
                vec![resource("orders", &["127.0.0.1:1", "127.0.0.1:2"])],
                &[],
            ))
            .unwrap()
    }

    #[test]
    fn pick_spreads_over_endpoints_skips_tried_ones_and_state_survives_updates() {
        let s = orders_on_two_endpoints();
        let orders = &s.services["orders"];
        let now = Instant::now();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            seen.insert(orders.pick(now, &[]).unwrap());
        }
        assert_eq!(seen.len(), 2, "both endpoints are picked");
        for _ in 0..20 {
            assert_eq!(orders.pick(now, &[0]), Some(1), "a retry goes elsewhere");
        }
        assert!(
            orders.pick(now, &[0, 1]).is_some(),
            "all tried: any will do"
        );
        let state = orders.endpoints[1].state.clone();
        let s2 = s
            .apply(&update(
                2,
                false,
                vec![resource("orders", &["127.0.0.1:2", "127.0.0.1:3"])],
                &[],
            ))
            .unwrap();
        assert!(
            Arc::ptr_eq(&s2.services["orders"].endpoints[0].state, &state),
            "kept"
        );
        assert!(
            Arc::ptr_eq(&s2.services["orders"].state, &orders.state),
            "budget kept"
        );
        let empty = Snapshot::default()
            .apply(&update(1, true, vec![resource("web", &[])], &[]))
            .unwrap();
        assert!(empty.services["web"].pick(now, &[]).is_none());
    }

    #[test]
    fn a_down_endpoint_is_skipped_redialed_once_per_wait_and_tried_when_all_are_down() {
        let s = orders_on_two_endpoints();
        let orders = &s.services["orders"];
        let t0 = Instant::now();
        assert!(orders.endpoints[0].state.connect_failed(t0), "newly down");
        for _ in 0..20 {
            assert_eq!(orders.pick(t0, &[]), Some(1), "the down one is skipped");
        }
        let wait = crate::resilience::reachability::REDIAL_BASE;
        assert_eq!(orders.pick(t0 + wait, &[]), Some(0), "one redial");
        assert_eq!(orders.pick(t0 + wait, &[]), Some(1), "only one");
        // Both down: try them anyway.
        assert!(orders.endpoints[1].state.connect_failed(t0 + wait));
        assert!(orders.pick(t0 + wait, &[]).is_some());
        // A connection works again: back in the rotation.
        orders.endpoints[0].state.connected();
        for _ in 0..20 {
            assert_eq!(orders.pick(t0 + wait, &[]), Some(0));
        }
    }

    #[test]
    fn an_ejected_endpoint_is_left_out_then_probed_once_and_the_scan_runs_only_while_one_is() {
        let s = orders_on_two_endpoints();
        let orders = &s.services["orders"];
        let policy = orders.policy.outlier.clone();
        let t0 = Instant::now();
        assert!(orders.unsettled.none(), "all ready: the fast path");
        let mut ejected = false;
        for _ in 0..policy.consecutive_failures.max(1) {
            ejected |= orders.endpoints[0].state.record(false, None, t0, &policy);
        }
        assert!(ejected);
        assert!(!orders.unsettled.none());
        for _ in 0..20 {
            assert_eq!(orders.pick(t0, &[]), Some(1), "the ejected one is left out");
        }
        let later = t0 + policy.max_ejection * 2;
        assert_eq!(orders.pick(later, &[]), Some(0), "the probe");
        assert_eq!(orders.pick(later, &[]), Some(1), "one probe at a time");
        let rtt = Some(std::time::Duration::from_millis(1));
        orders.endpoints[0].state.record(true, rtt, later, &policy);
        assert!(orders.unsettled.none(), "the probe answered: ready again");
        // An endpoint that leaves the service while down stops counting once it is gone.
        assert!(orders.endpoints[1].state.connect_failed(later));
        assert!(!orders.unsettled.none());
        let s2 = s
            .apply(&update(
                2,
                false,
                vec![resource("orders", &["127.0.0.1:1"])],
                &[],
            ))
            .unwrap();
        assert!(
            !s2.services["orders"].unsettled.none(),
            "the old snapshot holds it"
        );
        drop(s);
        assert!(s2.services["orders"].unsettled.none());
        let seen: std::collections::HashSet<_> = (0..20)
            .filter_map(|_| s2.services["orders"].pick(later, &[]))
            .collect();
        assert_eq!(seen.len(), 1);
    }

    #[test]
    fn save_and_load() {
        let dir = std::env::temp_dir().join(format!("sinew-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("snapshot.pb");
        assert!(Snapshot::load(&path).unwrap().is_none());
        let s = Snapshot::default()
            .apply(&update(
                7,
                true,
                vec![resource("orders", &["127.0.0.1:1"])],
                &[],
            ))
            .unwrap();
        s.save(&path).unwrap();
        let back = Snapshot::load(&path).unwrap().unwrap();
        assert_eq!(back.version, 7);
        assert_eq!(back.services["orders"].endpoints[0].target.addr.port(), 1);
        std::fs::write(&path, b"\xff\xff garbage").unwrap();
        assert!(Snapshot::load(&path).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
