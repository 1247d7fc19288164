//! The control plane's Prometheus metrics: their names, and the process-wide recorder.
//!
//! The `metrics` facade has one global recorder per process, so it is installed once and its
//! handle shared; several control planes in one process (tests) share the counters.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

pub const SIDECARS_CONNECTED: &str = "sinew_control_sidecars_connected";
pub const INSTANCES: &str = "sinew_control_instances";
pub const CONFIG_VERSION: &str = "sinew_control_config_version";
pub const UPDATES_SENT: &str = "sinew_control_updates_sent_total";
pub const ACKS: &str = "sinew_control_acks_total";
pub const NACKS: &str = "sinew_control_nacks_total";
pub const CERTIFICATES_ISSUED: &str = "sinew_control_certificates_issued_total";
pub const POLICY_APPLY: &str = "sinew_control_policy_apply_total";
pub const CONNECTIONS_REFUSED: &str = "sinew_control_connections_refused_total";
pub const HANDSHAKE_TIMEOUTS: &str = "sinew_control_handshake_timeouts_total";
pub const UPDATES_TOO_LARGE: &str = "sinew_control_updates_too_large_total";
pub const CA_EXPIRY: &str = "sinew_control_ca_expiry_timestamp_seconds";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                tracing::warn!(
                    "another metrics recorder is installed; /metrics will be empty: {e}"
                );
            }
            describe();
            register();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_gauge!(SIDECARS_CONNECTED, "Sidecars with an open Connect stream.");
    metrics::describe_gauge!(
        INSTANCES,
        "Registered instances (connected or within their lease)."
    );
    metrics::describe_gauge!(CONFIG_VERSION, "The current config version.");
    metrics::describe_counter!(UPDATES_SENT, "Updates sent to sidecars.");
    metrics::describe_counter!(ACKS, "Updates acknowledged by sidecars.");
    metrics::describe_counter!(NACKS, "Updates refused by sidecars.");
    metrics::describe_counter!(CERTIFICATES_ISSUED, "Certificates issued by the mesh CA.");
    metrics::describe_gauge!(
        CA_EXPIRY,
        "When the mesh CA's certificate expires (unix seconds)."
    );
    metrics::describe_counter!(
        POLICY_APPLY,
        "Policy changes by result (ok, invalid, error)."
    );
    metrics::describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed at once because the port had --max-connections open, by port."
    );
    metrics::describe_counter!(
        HANDSHAKE_TIMEOUTS,
        "gRPC connections closed for sending no HTTP/2 preface within --handshake-timeout."
    );
    metrics::describe_counter!(
        UPDATES_TOO_LARGE,
        "Updates not sent because they exceeded what a sidecar decodes (16 MiB)."
    );
}

/// Makes every counter appear (at 0) before its first event, so dashboards and alerts see
/// the series from the start.
fn register() {
    for name in [
        UPDATES_SENT,
        ACKS,
        NACKS,
        CERTIFICATES_ISSUED,
        HANDSHAKE_TIMEOUTS,
        UPDATES_TOO_LARGE,
    ] {
        metrics::counter!(name).increment(0);
    }
    for port in ["grpc", "http"] {
        metrics::counter!(CONNECTIONS_REFUSED, "port" => port).increment(0);
    }
    for result in ["ok", "invalid", "error"] {
        metrics::counter!(POLICY_APPLY, "result" => result).increment(0);
    }
}

/// Counts one policy change attempt (admin API or files) by `result`.
pub fn policy_apply(result: &'static str) {
    metrics::counter!(POLICY_APPLY, "result" => result).increment(1);
}
