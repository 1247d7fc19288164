//! What the sidecar's tasks share: the snapshot, readiness flags and the shutdown signal.

use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use tokio::sync::watch;

pub struct Shared {
    pub service: String,
    pub node_id: String,
    pub snapshot: ArcSwap<Snapshot>,
    pub snapshot_path: PathBuf,
    /// Read at every (re)connect, so a rotated token is picked up.
    pub join_token_file: PathBuf,
    /// Set once the certificate is in hand and the inbound accepts connections.
    pub identity_ready: AtomicBool,
    pub control_connected: AtomicBool,
    /// `true` once shutdown has begun.
    pub shutdown: watch::Sender<bool>,
    /// The events outbox, once open (the control stream answers questions about it).
    pub events: std::sync::OnceLock<std::sync::Arc<crate::events::Events>>,
    /// The version of the snapshot just applied: requests waiting for endpoints watch it.
    pub updated: watch::Sender<u64>,
    /// Whether the local app passes its health checks (always true without checks).
    pub app_healthy: watch::Sender<bool>,
    /// The certificate presented now (`None` until one is in hand); renewal replaces it.
    pub certificate: watch::Sender<Option<crate::identity::CertificateInfo>>,
}

impl Shared {
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub fn is_app_healthy(&self) -> bool {
        *self.app_healthy.borrow()
    }
}

/// Resolves once shutdown has begun (or the sender is gone).
pub async fn shutdown_begun(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
