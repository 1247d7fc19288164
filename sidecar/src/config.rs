//! Bootstrap configuration: flags (each with an environment variable), validated once into
//! [`Config`], then passed down. Nothing below re-reads the environment.

use crate::health::{Check, HealthConfig};
use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AppProtocol {
    /// HTTP/1.1 to the app.
    Http1,
    /// HTTP/2 without TLS (gRPC servers).
    H2c,
}

/// sinew-sidecar: the data plane beside one instance of a service.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// The mesh service this instance belongs to.
    #[arg(long, env = "SINEW_SERVICE")]
    pub service: String,
    /// The app's port on 127.0.0.1.
    #[arg(long, env = "SINEW_APP_PORT", conflicts_with = "app_addr")]
    pub app_port: Option<u16>,
    /// The app's address, when it is not 127.0.0.1.
    #[arg(long, env = "SINEW_APP_ADDR")]
    pub app_addr: Option<SocketAddr>,
    /// How to speak to the app.
    #[arg(long, env = "SINEW_APP_PROTOCOL", value_enum, default_value = "http1")]
    pub app_protocol: AppProtocol,
    /// Control-plane gRPC address, host:port (repeatable, or comma-separated in the env).
    #[arg(
        long = "control",
        env = "SINEW_CONTROL",
        value_delimiter = ',',
        default_value = "127.0.0.1:7700"
    )]
    pub control: Vec<String>,
    /// The join token that proves this sidecar may join [default: ./.sinew/control/join-token].
    #[arg(long, env = "SINEW_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Outbound listener (app -> mesh), HTTP/1.1 and h2c. Port 0 picks a free port.
    #[arg(long, env = "SINEW_OUTBOUND", default_value = "127.0.0.1:4140")]
    pub outbound: SocketAddr,
    /// Inbound listener (mesh -> app), QUIC with mutual TLS.
    #[arg(long, env = "SINEW_INBOUND", default_value = "0.0.0.0:4143")]
    pub inbound: SocketAddr,
    /// Admin listener: /ready /live /metrics /config /endpoints /shutdown.
    #[arg(long, env = "SINEW_ADMIN", default_value = "127.0.0.1:4191")]
    pub admin: SocketAddr,
    /// Web origins (scheme://host[:port]) whose requests the admin port and the events API
    /// accept; any other request carrying `Origin` gets 403 [default: none].
    #[arg(long, env = "SINEW_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// The address other sidecars reach this one at [default: the inbound address, with an
    /// unspecified IP replaced by 127.0.0.1].
    #[arg(long, env = "SINEW_ADVERTISE")]
    pub advertise: Option<SocketAddr>,
    /// State: certificate, last good snapshot, node id [default: ./.sinew/sidecar-<service>].
    #[arg(long, env = "SINEW_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This instance's id in the mesh [default: generated once, kept in the data dir].
    #[arg(long, env = "SINEW_NODE_ID")]
    pub node_id: Option<String>,
    /// Locality label reported to the control plane.
    #[arg(long, env = "SINEW_ZONE", default_value = "")]
    pub zone: String,
    /// Log lines for people (`text`) or one JSON object per line (`json`), on stderr.
    #[arg(long, env = "SINEW_LOG_FORMAT", default_value = "text")]
    pub log_format: sinew_proto::logging::LogFormat,
    /// Worker threads [default: one per core].
    #[arg(long, env = "SINEW_THREADS")]
    pub threads: Option<usize>,
    /// How long a shutdown waits for in-flight requests.
    #[arg(long, env = "SINEW_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Largest event data the events API accepts, in bytes (past it: 413 `too-large`).
    #[arg(long, env = "SINEW_EVENT_MAX_BYTES", default_value_t = 1024 * 1024)]
    pub event_max_bytes: usize,
    /// Undelivered events the outbox holds before publishes get 503 `outbox-full`.
    #[arg(long, env = "SINEW_OUTBOX_MAX_EVENTS", default_value_t = 100_000)]
    pub outbox_max_events: u64,
    /// Stored bytes of undelivered events (data and every attribute) the outbox holds before
    /// publishes get 503 `outbox-full`.
    #[arg(long, env = "SINEW_OUTBOX_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub outbox_max_bytes: u64,
    /// Dead letters kept; past it the oldest go (`sinew_dead_letters_evicted_total`).
    #[arg(long, env = "SINEW_DEAD_LETTERS_MAX_EVENTS", default_value_t = 10_000)]
    pub dead_letters_max_events: u64,
    /// Stored bytes of the dead letters kept; past it the oldest go.
    #[arg(long, env = "SINEW_DEAD_LETTERS_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub dead_letters_max_bytes: u64,
    /// Where events are kept and fanned out from: `embedded` (this sidecar's redb outbox) or
    /// `nats` (a NATS JetStream server shared by the mesh, see `--nats-url`).
    #[arg(
        long,
        env = "SINEW_EVENTS_BACKEND",
        value_enum,
        default_value = "embedded"
    )]
    pub events_backend: EventsBackend,
    /// The NATS server for `--events-backend nats`.
    #[arg(long, env = "SINEW_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Names this mesh's JetStream streams (`<PREFIX>_EVENTS`, `<PREFIX>_DEAD`) and subjects
    /// (`<prefix>.ev.>`...), so several meshes can share one NATS server.
    #[arg(long, env = "SINEW_NATS_PREFIX", default_value = "sinew")]
    pub nats_prefix: String,
    /// A file holding the NATS server's token.
    #[arg(long, env = "SINEW_NATS_TOKEN_FILE")]
    pub nats_token_file: Option<PathBuf>,
    /// A NATS `.creds` file (user JWT and nkey seed).
    #[arg(long, env = "SINEW_NATS_CREDS", conflicts_with_all = ["nats_token_file", "nats_nkey_file"])]
    pub nats_creds: Option<PathBuf>,
    /// A file holding a NATS nkey seed.
    #[arg(long, env = "SINEW_NATS_NKEY_FILE", conflicts_with = "nats_token_file")]
    pub nats_nkey_file: Option<PathBuf>,
    /// CA certificates (PEM) for the NATS server's TLS certificate (turns TLS on).
    #[arg(long, env = "SINEW_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for NATS servers that verify clients (with `--nats-tls-key`).
    #[arg(long, env = "SINEW_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, env = "SINEW_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
    /// Refuse a NATS server that does not speak TLS.
    #[arg(long, env = "SINEW_NATS_TLS")]
    pub nats_tls: bool,
    /// Health-check the app with `GET PATH` (2xx/3xx pass) [default: no checks].
    #[arg(long, env = "SINEW_HEALTH_HTTP", conflicts_with = "health_grpc")]
    pub health_http: Option<String>,
    /// Health-check the app with grpc.health.v1 Check for SERVICE (empty: the whole server).
    #[arg(long, env = "SINEW_HEALTH_GRPC", num_args = 0..=1, default_missing_value = "")]
    pub health_grpc: Option<String>,
    /// Time between health checks.
    #[arg(long, env = "SINEW_HEALTH_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub health_interval: Duration,
    /// Time one health check may take.
    #[arg(long, env = "SINEW_HEALTH_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub health_timeout: Duration,
    /// How long a peer may take to send a request's head on a new stream; a stream still
    /// without its head then is reset (a stalled or slowloris peer holds nothing for long).
    #[arg(long, env = "SINEW_INBOUND_HEAD_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub inbound_head_timeout: Duration,
    /// Streams (requests) one peer connection may have open at once; past it QUIC flow
    /// control makes the peer wait before opening more.
    #[arg(long, env = "SINEW_INBOUND_MAX_STREAMS", default_value_t = 1024)]
    pub inbound_max_streams: u32,
    /// Requests from the mesh in flight to the app at once, all peers together; past it the
    /// sidecar refuses at once with 503 `overloaded` (callers try another instance).
    #[arg(long, env = "SINEW_INBOUND_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub inbound_max_in_flight: usize,
    /// Passing checks in a row that bring an unhealthy app back.
    #[arg(long, env = "SINEW_HEALTHY_THRESHOLD", default_value_t = 1)]
    pub healthy_threshold: u32,
    /// Failing checks in a row that withdraw a healthy app.
    #[arg(long, env = "SINEW_UNHEALTHY_THRESHOLD", default_value_t = 2)]
    pub unhealthy_threshold: u32,
}

/// `--events-backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventsBackend {
    Embedded,
    Nats,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    sinew_proto::duration::parse(text)
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub service: String,
    pub app_addr: SocketAddr,
    pub app_protocol: AppProtocol,
    pub control: Vec<String>,
    pub join_token_file: PathBuf,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    /// `--allowed-origins`, checked on the admin port and the events API.
    pub local_guard: crate::local_guard::LocalGuard,
    pub advertise: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub node_id: Option<String>,
    pub zone: String,
    pub drain_timeout: Duration,
    pub event_limits: crate::events::Limits,
    /// `None`: the embedded outbox.
    pub nats: Option<crate::events::NatsConfig>,
    /// Active health checks of the app; `None` without `--health-http`/`--health-grpc`.
    pub health: Option<HealthConfig>,
    pub inbound_limits: InboundLimits,
}

/// What one peer, or all of them, may hold of the inbound at once.
#[derive(Debug, Clone, Copy)]
pub struct InboundLimits {
    pub head_timeout: Duration,
    pub max_streams_per_connection: u32,
    pub max_in_flight: usize,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits {
            head_timeout: Duration::from_secs(10),
            max_streams_per_connection: 1024,
            max_in_flight: 4096,
        }
    }
}

impl Args {
    pub fn into_config(self) -> Result<Config, String> {
        sinew_proto::policy::validate_name(&self.service).map_err(|e| format!("--service: {e}"))?;
        let app_addr = match (self.app_addr, self.app_port) {
            (Some(addr), _) => addr,
            (None, Some(port)) => SocketAddr::from(([127, 0, 0, 1], port)),
            (None, None) => return Err("--app-port or --app-addr is required".into()),
        };
        let check = match (self.health_http, self.health_grpc) {
            (Some(path), _) if !path.starts_with('/') => {
                return Err(format!(
                    "--health-http: `{path}` is not a path (it starts with /)"
                ));
            }
            (Some(path), _) => Some(Check::Http(path)),
            (None, Some(service)) => Some(Check::Grpc(service)),
            (None, None) => None,
        };
        let health = match check {
            None => None,
            Some(check) => {
                if self.health_interval.is_zero() || self.health_timeout.is_zero() {
                    return Err(
                        "--health-interval and --health-timeout must be at least 1ms".into(),
                    );
                }
                if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
                    return Err(
                        "--healthy-threshold and --unhealthy-threshold must be at least 1".into(),
                    );
                }
                Some(HealthConfig {
                    check,
                    interval: self.health_interval,
                    timeout: self.health_timeout,
                    healthy_threshold: self.healthy_threshold,
                    unhealthy_threshold: self.unhealthy_threshold,
                })
            }
        };
        let nats = match self.events_backend {
            EventsBackend::Embedded => None,
            EventsBackend::Nats => {
                crate::events::validate_prefix(&self.nats_prefix)
                    .map_err(|e| format!("--nats-prefix: {e}"))?;
                Some(crate::events::NatsConfig {
                    url: self.nats_url,
                    prefix: self.nats_prefix,
                    auth: crate::events::NatsAuth {
                        token_file: self.nats_token_file,
                        creds_file: self.nats_creds,
                        nkey_file: self.nats_nkey_file,
                        require_tls: self.nats_tls || self.nats_tls_ca.is_some(),
                        tls_ca: self.nats_tls_ca,
                        tls_client: self.nats_tls_cert.zip(self.nats_tls_key),
                    },
                })
            }
        };
        if self.inbound_head_timeout.is_zero()
            || self.inbound_max_streams == 0
            || self.inbound_max_in_flight == 0
        {
            return Err(
                "--inbound-head-timeout, --inbound-max-streams and --inbound-max-in-flight must be above 0"
                    .into(),
            );
        }
        let local_guard = crate::local_guard::LocalGuard::new(&self.allowed_origins)
            .map_err(|e| format!("--allowed-origins: {e}"))?;
        if self.control.iter().all(|c| c.trim().is_empty()) {
            return Err("--control: at least one control-plane address is required".into());
        }
        Ok(Config {
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from(format!(".sinew/sidecar-{}", self.service))),
            service: self.service,
            app_addr,
            app_protocol: self.app_protocol,
            control: self
                .control
                .into_iter()
                .filter(|c| !c.trim().is_empty())
                .collect(),
            join_token_file: self
                .join_token_file
                .unwrap_or_else(|| PathBuf::from(".sinew/control/join-token")),
            outbound: self.outbound,
            inbound: self.inbound,
            admin: self.admin,
            local_guard,
            advertise: self.advertise,
            node_id: self.node_id,
            zone: self.zone,
            drain_timeout: self.drain_timeout,
            event_limits: crate::events::Limits {
                max_event_bytes: self.event_max_bytes,
                max_outbox_events: self.outbox_max_events,
                max_outbox_bytes: self.outbox_max_bytes,
                dead_letters: crate::events::outbox::DeadBound {
                    max_events: self.dead_letters_max_events,
                    max_bytes: self.dead_letters_max_bytes,
                },
                ..crate::events::Limits::default()
            },
            nats,
            health,
            inbound_limits: InboundLimits {
                head_timeout: self.inbound_head_timeout,
                max_streams_per_connection: self.inbound_max_streams,
                max_in_flight: self.inbound_max_in_flight,
            },
        })
    }
}
