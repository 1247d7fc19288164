//! Command-line flags of `sinew-control`; each also reads `SINEW_CONTROL_<NAME>`.

use crate::config::Config;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Sinew's control plane: registry, policy, certificate authority, pushed to every sidecar.
#[derive(Debug, Parser)]
#[command(name = "sinew-control", version)]
pub struct Flags {
    /// gRPC address (sidecar API + admin API). Port 0 picks a free port.
    #[arg(
        long,
        value_name = "ADDR",
        env = "SINEW_CONTROL_GRPC",
        default_value = "0.0.0.0:7700"
    )]
    pub grpc: SocketAddr,
    /// HTTP address (/healthz, /metrics). Port 0 picks a free port.
    #[arg(
        long,
        value_name = "ADDR",
        env = "SINEW_CONTROL_HTTP",
        default_value = "0.0.0.0:7701"
    )]
    pub http: SocketAddr,
    /// Directory for the store and the generated tokens.
    #[arg(
        long,
        value_name = "PATH",
        env = "SINEW_CONTROL_DATA_DIR",
        default_value = "./.sinew/control"
    )]
    pub data_dir: PathBuf,
    /// Log lines for people (`text`) or one JSON object per line (`json`), on stderr.
    #[arg(long, env = "SINEW_CONTROL_LOG_FORMAT", default_value = "text")]
    pub log_format: sinew_proto::logging::LogFormat,
    /// Policy YAML file, or directory of *.yaml/*.yml; watched for changes.
    #[arg(long, value_name = "PATH", env = "SINEW_CONTROL_POLICY")]
    pub policy: Option<PathBuf>,
    /// Admin token file [default: <data-dir>/admin-token, generated if missing].
    #[arg(long, value_name = "PATH", env = "SINEW_CONTROL_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Join token file [default: <data-dir>/join-token, generated if missing].
    #[arg(long, value_name = "PATH", env = "SINEW_CONTROL_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// How long an instance stays registered after its stream ends.
    #[arg(long, value_name = "DUR", env = "SINEW_CONTROL_LEASE_GRACE", default_value = "10s", value_parser = duration)]
    pub lease_grace: Duration,
    /// SPIFFE trust domain of issued identities.
    #[arg(
        long,
        value_name = "DOMAIN",
        env = "SINEW_CONTROL_TRUST_DOMAIN",
        default_value = "sinew.local"
    )]
    pub trust_domain: String,
    /// Lifetime of issued certificates.
    #[arg(long, value_name = "DUR", env = "SINEW_CONTROL_CERT_LIFETIME", default_value = "24h", value_parser = duration)]
    pub cert_lifetime: Duration,
    /// How long a new connection may take to send its HTTP/2 preface (gRPC) or a request's
    /// headers (HTTP) before it is closed.
    #[arg(long, value_name = "DUR", env = "SINEW_CONTROL_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// Open connections per port at most; past it a new one is closed at once.
    #[arg(
        long,
        value_name = "N",
        env = "SINEW_CONTROL_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    pub max_connections: usize,
    /// Lifetime of the mesh CA, used only when this start creates it [default: 10 years].
    /// A CA already in the data dir keeps its own (a warning says so).
    #[arg(long, value_name = "DUR", env = "SINEW_CONTROL_CA_LIFETIME", value_parser = duration)]
    pub ca_lifetime: Option<Duration>,
}

fn duration(text: &str) -> Result<Duration, String> {
    sinew_proto::duration::parse(text)
}

impl Flags {
    pub fn into_config(self) -> Config {
        Config {
            grpc_addr: self.grpc,
            http_addr: self.http,
            data_dir: self.data_dir,
            policy: self.policy,
            admin_token_file: self.admin_token_file,
            join_token_file: self.join_token_file,
            lease_grace: self.lease_grace,
            trust_domain: self.trust_domain,
            cert_lifetime: self.cert_lifetime,
            handshake_timeout: self.handshake_timeout,
            max_connections: self.max_connections,
            ca_lifetime: self.ca_lifetime,
            ..Config::default()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_config_defaults() {
        let flags = Flags::try_parse_from(["sinew-control"]).unwrap();
        assert_eq!(flags.into_config(), Config::default());
    }

    #[test]
    fn durations_use_the_policy_syntax() {
        let flags = Flags::try_parse_from([
            "sinew-control",
            "--lease-grace",
            "300ms",
            "--grpc",
            "127.0.0.1:0",
        ])
        .unwrap();
        assert_eq!(flags.lease_grace, Duration::from_millis(300));
        assert!(Flags::try_parse_from(["sinew-control", "--lease-grace", "3"]).is_err());
    }
}
