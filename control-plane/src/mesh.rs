//! The control plane's shared state: policy, registry and config version, behind one lock.
//!
//! Every change goes through here and follows the same steps: plan (pure), persist when it is
//! policy, commit to memory, bump the version, rebuild the snapshot once, publish it on a
//! `watch` channel. Stream tasks wait on that channel, so a change wakes each of them once,
//! with no polling; a burst of changes coalesces into the latest snapshot.
//!
//! The lock is a `std::sync::Mutex` held only for short, non-async sections (never across an
//! `.await`). The store write of a policy change happens under it, so concurrent applies are
//! serialized and memory never gets ahead of disk.

use crate::clock::unix_ms;
use crate::metrics as m;
use crate::policies::{Change, Outcomes, PolicyEntry, PolicySet};
use crate::registry::{InstanceSpec, Liveness, Registry};
use crate::snapshot::Snapshot;
use crate::store::{Store, StoreError, StoredDocument};
use crate::sync::Answer;
use sinew_proto::policy::{Document, Kind, parse_documents};
use sinew_proto::v1::{InstanceInfo, ServiceInfo, SidecarStatus, StatusResponse};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// Versions are reserved in the store this many at a time (see `store`).
const VERSION_BLOCK: u64 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The control plane takes its policy from files: one source of truth, so the admin
    /// API neither applies nor deletes.
    #[error(
        "this control plane takes its policy from {} (sinew-control --policy): edit it there \
         (it is reloaded within a second); `apply` and `delete` work only on a control plane \
         started without --policy",
        .0.display()
    )]
    PolicyFromFiles(PathBuf),
    /// `--strict` and references to services that have neither policy nor instances.
    #[error("refused (--strict), nothing applied:\n{}", .0.join("\n"))]
    Dangling(Vec<String>),
}

/// How to apply documents through the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Refuse when a document references a service with neither policy nor instances.
    pub strict: bool,
    /// Plan and report, change nothing.
    pub dry_run: bool,
}

/// What an apply did (or, dry, would do).
#[derive(Debug, Default)]
pub struct Applied {
    pub outcomes: Outcomes,
    /// The version after the apply.
    pub version: u64,
    /// References to services with neither policy nor instances.
    pub warnings: Vec<String>,
    /// Dry runs only: per document, the stored YAML (if any) and the YAML it would become.
    pub diffs: Vec<(Option<String>, String)>,
}

/// The services with a live instance (connected, or within its lease).
fn live_services(inner: &Inner) -> BTreeSet<String> {
    inner
        .registry
        .live_specs()
        .map(|s| s.service.clone())
        .collect()
}

#[derive(Debug)]
struct Inner {
    policies: PolicySet,
    registry: Registry,
    /// The live instances as the store has them (so only changes are written).
    stored_instances: BTreeMap<String, InstanceSpec>,
    version: u64,
    version_floor: u64,
}

#[derive(Debug)]
pub struct Mesh {
    inner: Mutex<Inner>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    store: Store,
    trust_domain: String,
    lease_changed: Notify,
    /// The `--policy` path when policy comes from files (then the admin API is read-only).
    policy_source: Option<PathBuf>,
    /// The version at start: after a restart, past the last reserved block (see `bump`).
    started_at: u64,
}

impl Mesh {
    /// Loads the stored policy and version floor.
    pub fn open(store: Store, trust_domain: &str, lease_grace: Duration) -> anyhow::Result<Mesh> {
        let mut entries = Vec::new();
        for stored in store.documents()? {
            let mut docs = parse_documents(&stored.yaml).map_err(|e| {
                anyhow::anyhow!("stored document {} no longer validates: {e}", stored.key)
            })?;
            match (docs.pop(), docs.is_empty()) {
                (Some(doc), true) => entries.push(PolicyEntry::new(doc, stored.from_file)),
                _ => anyhow::bail!("stored document {} is not exactly one document", stored.key),
            }
        }
        let version = store.version_floor()?;
        let mut registry = Registry::new(lease_grace);
        let mut stored_instances = BTreeMap::new();
        let now = unix_ms();
        for (node_id, json) in store.instances()? {
            match serde_json::from_str::<InstanceSpec>(&json) {
                Ok(spec) => {
                    registry.restore(spec.clone(), now);
                    stored_instances.insert(node_id, spec);
                }
                Err(e) => tracing::warn!(node_id, "ignoring a stored instance: {e}"),
            }
        }
        if !stored_instances.is_empty() {
            tracing::info!(
                instances = stored_instances.len(),
                "restored instances from before the restart; their leases run until they reconnect"
            );
        }
        let inner = Inner {
            stored_instances,
            policies: PolicySet::from_entries(entries),
            registry,
            version,
            version_floor: version,
        };
        let snapshot = Snapshot::build(
            version,
            &inner.policies,
            inner.registry.entries(),
            trust_domain,
            &Snapshot::default(),
        );
        metrics::gauge!(m::CONFIG_VERSION).set(version as f64);
        Ok(Mesh {
            inner: Mutex::new(inner),
            snapshots: watch::Sender::new(Arc::new(snapshot)),
            store,
            trust_domain: trust_domain.to_string(),
            lease_changed: Notify::new(),
            policy_source: None,
            started_at: version,
        })
    }

    /// Policy comes from the files at `path` (`--policy`): the admin API may no longer
    /// apply or delete.
    pub fn with_policy_source(mut self, path: &Path) -> Mesh {
        self.policy_source = Some(path.to_path_buf());
        self
    }

    /// The `--policy` path when policy comes from files.
    pub fn policy_source(&self) -> Option<&Path> {
        self.policy_source.as_deref()
    }

    fn writable(&self) -> Result<(), MeshError> {
        match &self.policy_source {
            Some(path) => Err(MeshError::PolicyFromFiles(path.clone())),
            None => Ok(()),
        }
    }

    /// The snapshots, newest first: what stream tasks wait on.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    pub fn version(&self) -> u64 {
        self.lock().version
    }

    // ----- policy -----

    /// Applies documents from the admin API (or, dry, says what that would do): each
    /// document's outcome, the version, and the references to unknown services.
    pub fn apply(&self, docs: Vec<Document>, options: ApplyOptions) -> Result<Applied, MeshError> {
        if !options.dry_run {
            self.writable()?;
        }
        let mut inner = self.lock();
        let live = live_services(&inner);
        let warnings = inner.policies.dangling_references(&docs, &live);
        if options.strict && !warnings.is_empty() {
            return Err(MeshError::Dangling(warnings));
        }
        let diffs = if options.dry_run {
            docs.iter()
                .map(|d| {
                    let live = inner.policies.get(d.kind, &d.name);
                    (live.map(|e| e.document.to_yaml()), d.to_yaml())
                })
                .collect()
        } else {
            Vec::new()
        };
        let change = inner.policies.plan_apply(docs);
        if !options.dry_run {
            self.write_policy(&mut inner, &change)?;
        }
        Ok(Applied {
            outcomes: change.outcomes,
            version: inner.version,
            warnings,
            diffs,
        })
    }

    /// The `--policy` files now hold exactly `docs`. Returns whether the policy changed.
    pub fn sync_files(&self, docs: Vec<Document>) -> Result<bool, MeshError> {
        let mut inner = self.lock();
        let live = live_services(&inner);
        for warning in inner.policies.dangling_references(&docs, &live) {
            tracing::warn!("policy files: {warning}");
        }
        let change = inner.policies.plan_file_sync(docs);
        for key in &change.deletes {
            tracing::info!(document = %key, "removed: not in the policy files");
        }
        self.write_policy(&mut inner, &change)?;
        Ok(change.changes_policy())
    }

    /// Deletes a document; `None` if there is none.
    pub fn delete(&self, kind: Kind, name: &str) -> Result<Option<u64>, MeshError> {
        self.writable()?;
        let mut inner = self.lock();
        let Some(change) = inner.policies.plan_delete(kind, name) else {
            return Ok(None);
        };
        self.write_policy(&mut inner, &change)?;
        Ok(Some(inner.version))
    }

    /// The stored documents of `kind` (`None`: of every kind), all of them or those named
    /// `name`.
    pub fn documents(&self, kind: Option<Kind>, name: Option<&str>) -> Vec<Document> {
        let inner = self.lock();
        inner
            .policies
            .all()
            .filter(|e| kind.is_none_or(|k| e.document.kind == k))
            .filter(|e| name.is_none_or(|n| e.document.name == n))
            .map(|e| e.document.clone())
            .collect()
    }

    fn write_policy(
        &self,
        inner: &mut MutexGuard<'_, Inner>,
        change: &Change,
    ) -> Result<(), MeshError> {
        if change.is_empty() {
            return Ok(());
        }
        let upserts: Vec<StoredDocument> = change
            .upserts
            .iter()
            .map(|(k, e)| StoredDocument {
                key: k.clone(),
                yaml: e.document.to_yaml(),
                from_file: e.from_file,
            })
            .collect();
        self.store.write_documents(&upserts, &change.deletes)?;
        inner.policies.commit(change);
        if change.changes_policy() {
            self.bump(inner);
        }
        Ok(())
    }

    // ----- registry -----

    /// Registers the instance of a new stream; returns the stream's session id.
    pub fn register(&self, spec: InstanceSpec, applied_version: u64) -> u64 {
        let mut inner = self.lock();
        if inner.stored_instances.get(&spec.node_id) != Some(&spec) {
            self.store_instance(&mut inner, &spec.node_id, Some(&spec));
        }
        let registered = inner.registry.register(spec, applied_version, unix_ms());
        if registered.endpoints_changed {
            self.bump(&mut inner);
        } else {
            self.update_gauges(&inner);
        }
        registered.session
    }

    /// The stream ended: the instance's lease starts running.
    pub fn disconnect(&self, node_id: &str, session: u64) {
        let mut inner = self.lock();
        if inner.registry.disconnect(node_id, session, unix_ms()) {
            self.update_gauges(&inner);
            self.lease_changed.notify_one();
        }
    }

    pub fn set_serving(&self, node_id: &str, session: u64, serving: bool) {
        let mut inner = self.lock();
        if inner.registry.set_serving(node_id, session, serving) {
            self.bump(&mut inner);
        }
    }

    pub fn set_certificate(
        &self,
        node_id: &str,
        session: u64,
        status: sinew_proto::v1::CertificateStatus,
    ) {
        self.lock()
            .registry
            .set_certificate(node_id, session, status);
    }

    pub fn record_sent(&self, node_id: &str, session: u64, version: u64, nonce: &str) {
        if let Some(t) = self.lock().registry.tracker_mut(node_id, session) {
            t.on_sent(version, nonce);
        }
    }

    pub fn record_ack(&self, node_id: &str, session: u64, version: u64, nonce: &str) -> Answer {
        match self.lock().registry.tracker_mut(node_id, session) {
            Some(t) => t.on_ack(version, nonce),
            None => Answer::Stale,
        }
    }

    pub fn record_nack(
        &self,
        node_id: &str,
        session: u64,
        version: u64,
        nonce: &str,
        error: &str,
    ) -> Answer {
        match self.lock().registry.tracker_mut(node_id, session) {
            Some(t) => t.on_nack(version, nonce, error),
            None => Answer::Stale,
        }
    }

    /// An Update for this stream was not sent (too large); shown like a NACK.
    pub fn record_refused(&self, node_id: &str, session: u64, version: u64, error: &str) {
        if let Some(t) = self.lock().registry.tracker_mut(node_id, session) {
            t.on_refused(version, error);
        }
    }

    /// Ends the leases that ran out; returns when to call again.
    pub fn expire(&self, now: i64) -> Option<i64> {
        let mut inner = self.lock();
        let changed = inner.registry.expire(now);
        let live: std::collections::BTreeSet<String> = inner
            .registry
            .live_specs()
            .map(|s| s.node_id.clone())
            .collect();
        let gone: Vec<String> = inner
            .stored_instances
            .keys()
            .filter(|node| !live.contains(*node))
            .cloned()
            .collect();
        for node in gone {
            self.store_instance(&mut inner, &node, None);
        }
        if changed {
            self.bump(&mut inner);
        } else {
            self.update_gauges(&inner);
        }
        inner.registry.next_deadline()
    }

    /// Resolves when a lease may have started (for the reaper).
    pub async fn lease_changed(&self) {
        self.lease_changed.notified().await;
    }

    // ----- views for the admin API -----

    /// Every service with a policy or registered instances.
    pub fn list_services(&self) -> Vec<ServiceInfo> {
        let inner = self.lock();
        let mut services: BTreeMap<String, ServiceInfo> = inner
            .policies
            .services()
            .map(|(name, _)| {
                (
                    name.to_string(),
                    ServiceInfo {
                        name: name.to_string(),
                        has_policy: true,
                        instances: Vec::new(),
                    },
                )
            })
            .collect();
        for entry in inner.registry.entries().filter(|e| e.is_live()) {
            let service = services
                .entry(entry.spec.service.clone())
                .or_insert_with(|| ServiceInfo {
                    name: entry.spec.service.clone(),
                    has_policy: false,
                    instances: Vec::new(),
                });
            service.instances.push(InstanceInfo {
                node_id: entry.spec.node_id.clone(),
                addr: entry.spec.addr.clone(),
                zone: entry.spec.zone.clone(),
                connected: entry.is_connected(),
                serving: entry.serving,
                lease_expires_unix_ms: match entry.liveness {
                    Liveness::Grace { until_ms } => until_ms,
                    _ => 0,
                },
            });
        }
        services.into_values().collect()
    }

    /// The version and every sidecar record (including ones whose lease ended recently).
    pub fn status(&self) -> StatusResponse {
        let inner = self.lock();
        StatusResponse {
            version: inner.version,
            started_at_version: self.started_at,
            policy_source: self
                .policy_source
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            sidecars: inner
                .registry
                .entries()
                .map(|e| SidecarStatus {
                    node_id: e.spec.node_id.clone(),
                    service: e.spec.service.clone(),
                    instance_addr: e.spec.addr.clone(),
                    connected: e.is_connected(),
                    connected_since_unix_ms: e.connected_since_ms,
                    sent_version: e.sync.sent_version,
                    applied_version: e.sync.applied_version,
                    state: e.sync.state.as_str().to_string(),
                    last_nack_error: e.sync.last_nack_error.clone(),
                    last_nack_version: e.sync.last_nack_version,
                    certificate_not_before_unix: e.certificate.as_ref().map(|c| c.not_before_unix),
                    certificate_not_after_unix: e.certificate.as_ref().map(|c| c.not_after_unix),
                    certificate_serial: e
                        .certificate
                        .as_ref()
                        .map(|c| c.serial.clone())
                        .unwrap_or_default(),
                })
                .collect(),
            // The CA is not the mesh's to know; the admin API adds it.
            ca_not_before_unix: None,
            ca_not_after_unix: None,
        }
    }

    // ----- internals -----

    /// A new config version: rebuild the snapshot once and wake every stream.
    /// Writes one instance's record (or its removal). A failed write is logged, not fatal:
    /// the cost is only that a restart would forget (or briefly keep) that instance.
    fn store_instance(
        &self,
        inner: &mut MutexGuard<'_, Inner>,
        node_id: &str,
        spec: Option<&InstanceSpec>,
    ) {
        let json = spec.and_then(|s| serde_json::to_string(s).ok());
        match self.store.write_instances(&[(node_id.to_string(), json)]) {
            Ok(()) => match spec {
                Some(spec) => {
                    inner
                        .stored_instances
                        .insert(node_id.to_string(), spec.clone());
                }
                None => {
                    inner.stored_instances.remove(node_id);
                }
            },
            Err(e) => tracing::warn!(node_id, "could not store the instance: {e}"),
        }
    }

    fn bump(&self, inner: &mut MutexGuard<'_, Inner>) {
        inner.version += 1;
        if inner.version > inner.version_floor {
            let floor = inner.version + VERSION_BLOCK;
            match self.store.set_version_floor(floor) {
                Ok(()) => inner.version_floor = floor,
                Err(e) => tracing::error!("cannot persist the config version floor: {e}"),
            }
        }
        let prev = self.snapshots.borrow().clone();
        let snapshot = Snapshot::build(
            inner.version,
            &inner.policies,
            inner.registry.entries(),
            &self.trust_domain,
            &prev,
        );
        self.snapshots.send_replace(Arc::new(snapshot));
        metrics::gauge!(m::CONFIG_VERSION).set(inner.version as f64);
        self.update_gauges(inner);
    }

    fn update_gauges(&self, inner: &Inner) {
        metrics::gauge!(m::SIDECARS_CONNECTED).set(inner.registry.connected_count() as f64);
        metrics::gauge!(m::INSTANCES).set(inner.registry.live_count() as f64);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent-enough data (every section is
        // small); keep serving rather than poisoning the whole control plane.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
