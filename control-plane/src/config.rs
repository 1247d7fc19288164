//! The control plane's configuration: a plain struct with defaults, validated once.
//!
//! Built from flags and environment in [`crate::flags`], or directly by tests and by tools
//! that embed a control plane.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// gRPC: the sidecar API and the admin API. Port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// HTTP: `/healthz` and `/metrics`. Port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// Holds `control.redb` and, unless given as files, `admin-token` and `join-token`.
    pub data_dir: PathBuf,
    /// A policy YAML file, or a directory of them, loaded at start and watched.
    pub policy: Option<PathBuf>,
    /// The admin token file; default `<data_dir>/admin-token`, created if missing.
    pub admin_token_file: Option<PathBuf>,
    /// The join token file; default `<data_dir>/join-token`, created if missing.
    pub join_token_file: Option<PathBuf>,
    /// How long an instance stays registered after its stream ends.
    pub lease_grace: Duration,
    /// The SPIFFE trust domain of issued identities.
    pub trust_domain: String,
    /// Lifetime of issued certificates.
    pub cert_lifetime: Duration,
    /// Lifetime of a CA created at this start (`None`: 10 years). A CA already in the store
    /// keeps its own.
    pub ca_lifetime: Option<Duration>,
    /// How often the policy files are checked for changes.
    pub policy_poll_interval: Duration,
    /// How long a new connection may take to send its HTTP/2 preface (gRPC port) or a
    /// request's headers (HTTP port) before it is closed.
    pub handshake_timeout: Duration,
    /// Open connections per port at most; past it a new one is closed at once.
    pub max_connections: usize,
    /// The largest Update sent to a sidecar; at most what sidecars decode
    /// ([`sinew_proto::limits::MAX_UPDATE_BYTES`]). Lower only in tests.
    pub max_update_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            grpc_addr: SocketAddr::from(([0, 0, 0, 0], 7700)),
            http_addr: SocketAddr::from(([0, 0, 0, 0], 7701)),
            data_dir: PathBuf::from("./.sinew/control"),
            policy: None,
            admin_token_file: None,
            join_token_file: None,
            lease_grace: Duration::from_secs(10),
            trust_domain: "sinew.local".into(),
            cert_lifetime: Duration::from_secs(24 * 3600),
            ca_lifetime: None,
            policy_poll_interval: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_update_bytes: sinew_proto::limits::MAX_UPDATE_BYTES,
        }
    }
}

impl Config {
    /// A config for tests and embedding: loopback, ephemeral ports, the given data directory.
    pub fn local(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            ..Config::default()
        }
    }

    /// Checks what the types do not; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        let td = &self.trust_domain;
        let td_ok = !td.is_empty()
            && td.len() <= 255
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !td.starts_with(['.', '-'])
            && !td.ends_with(['.', '-']);
        if !td_ok {
            return Err(format!(
                "--trust-domain `{td}`: must be a lowercase DNS name (a-z, 0-9, '-', '.')"
            ));
        }
        let day = Duration::from_secs(24 * 3600);
        // Seconds are for tests and demos of renewal; sidecars renew at 70% of it.
        if self.cert_lifetime < Duration::from_secs(10) || self.cert_lifetime > 366 * day {
            return Err("--cert-lifetime: must be between 10s and 366 days (8784h)".into());
        }
        if let Some(ca) = self.ca_lifetime
            && (ca < Duration::from_secs(60) || ca > 100 * 366 * day)
        {
            return Err("--ca-lifetime: must be between 1m and 100 years (878400h)".into());
        }
        if self.lease_grace > day {
            return Err("--lease-grace: must be at most 24h".into());
        }
        if self.handshake_timeout < Duration::from_millis(100)
            || self.handshake_timeout > Duration::from_secs(600)
        {
            return Err("--handshake-timeout: must be between 100ms and 10m".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections: must be at least 1".into());
        }
        if self.max_update_bytes == 0
            || self.max_update_bytes > sinew_proto::limits::MAX_UPDATE_BYTES
        {
            return Err(format!(
                "max update size: must be 1-{} bytes (what sidecars decode)",
                sinew_proto::limits::MAX_UPDATE_BYTES
            ));
        }
        if self.policy_poll_interval.is_zero() {
            return Err("policy poll interval must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_the_flag() {
        assert_eq!(Config::default().validate(), Ok(()));
        let bad = Config {
            trust_domain: "Sinew_Local".into(),
            ..Config::default()
        };
        assert!(bad.validate().unwrap_err().contains("--trust-domain"));
        let bad = Config {
            cert_lifetime: Duration::from_secs(1),
            ..Config::default()
        };
        assert!(bad.validate().unwrap_err().contains("--cert-lifetime"));
        let bad = Config {
            ca_lifetime: Some(Duration::from_secs(59)),
            ..Config::default()
        };
        assert!(bad.validate().unwrap_err().contains("--ca-lifetime"));
        let short = Config {
            cert_lifetime: Duration::from_secs(10),
            ca_lifetime: Some(Duration::from_secs(600)),
            ..Config::default()
        };
        assert_eq!(short.validate(), Ok(()));
    }
}
