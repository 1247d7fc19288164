//! Active health checks of the local app (`--health-http PATH` or `--health-grpc [SERVICE]`).
//!
//! Why the sidecar checks its own app: a process that is up but broken (lost its database,
//! deadlocked) still accepts connections, so neither the lease nor connect failures take it
//! out of the mesh. The sidecar asks it every `--health-interval`; `--unhealthy-threshold`
//! failures in a row report `Health{serving: false}` on the control stream, and the control
//! plane withdraws the instance from every caller's endpoint set; `--healthy-threshold`
//! passes in a row bring it back. Meanwhile the inbound answers 503 `unhealthy`, so callers
//! that have not heard yet retry elsewhere. The first result decides at once (no threshold):
//! an app that is not up yet is withdrawn within one interval, not several.
//!
//! [`Tracker`] is the verdict, plain data; [`run`] only moves time and bytes.

use crate::state::Shared;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sinew_proto::health::health_check_response::ServingStatus;
use sinew_proto::health::{HealthCheckRequest, health_client::HealthClient};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What to ask the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `GET PATH`; any 2xx or 3xx passes.
    Http(String),
    /// `grpc.health.v1.Health/Check` for this service name (`""`: the whole server); only
    /// `SERVING` passes.
    Grpc(String),
}

/// Health-check settings, from the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub check: Check,
    /// Time between checks (default 1 s).
    pub interval: Duration,
    /// Time one check may take; longer is a failure (default 500 ms).
    pub timeout: Duration,
    /// Passes in a row that make an unhealthy app healthy (default 1).
    pub healthy_threshold: u32,
    /// Failures in a row that make a healthy app unhealthy (default 2).
    pub unhealthy_threshold: u32,
}

/// The app's health from a series of check results.
#[derive(Debug, Clone)]
pub struct Tracker {
    healthy: Option<bool>,
    streak: u32,
    healthy_threshold: u32,
    unhealthy_threshold: u32,
}

impl Tracker {
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Tracker {
            healthy: None,
            streak: 0,
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
        }
    }

    /// Feeds one result; returns the new state when it changed (the first result always
    /// sets it).
    pub fn on_result(&mut self, pass: bool) -> Option<bool> {
        match self.healthy {
            None => {
                self.healthy = Some(pass);
                self.streak = 0;
                Some(pass)
            }
            Some(state) if state == pass => {
                self.streak = 0;
                None
            }
            Some(_) => {
                self.streak += 1;
                let needed = if pass {
                    self.healthy_threshold
                } else {
                    self.unhealthy_threshold
                };
                if self.streak >= needed {
                    self.healthy = Some(pass);
                    self.streak = 0;
                    Some(pass)
                } else {
                    None
                }
            }
        }
    }
}

/// Checks the app until shutdown, publishing each change on `shared.app_healthy` (the
/// control client reports it, the inbound reads it).
pub async fn run(shared: Arc<Shared>, app_addr: SocketAddr, service: String, config: HealthConfig) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut tracker = Tracker::new(config.healthy_threshold, config.unhealthy_threshold);
    let checker = Checker::new(app_addr, service, &config.check);
    let mut ticks = tokio::time::interval(config.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = crate::state::shutdown_begun(&mut shutdown) => return,
        }
        let result = tokio::time::timeout(config.timeout, checker.check(&config.check))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", config.timeout)));
        let pass = result.is_ok();
        metrics::counter!("sinew_health_checks_total", "result" => if pass { "pass" } else { "fail" })
            .increment(1);
        if let Err(reason) = &result {
            tracing::debug!("health check failed: {reason}");
        }
        if let Some(healthy) = tracker.on_result(pass) {
            metrics::gauge!("sinew_app_healthy").set(if healthy { 1.0 } else { 0.0 });
            let changed = shared.app_healthy.send_replace(healthy) != healthy;
            if changed {
                metrics::counter!("sinew_health_transitions_total", "to" => if healthy { "healthy" } else { "unhealthy" })
                    .increment(1);
                match &result {
                    Ok(()) => tracing::info!("the app is healthy again; serving"),
                    Err(reason) => {
                        tracing::warn!("the app is unhealthy ({reason}); withdrawing")
                    }
                }
            }
        }
    }
}

struct Checker {
    app_addr: SocketAddr,
    service: String,
    http: Client<HttpConnector, Empty<Bytes>>,
    grpc: Option<HealthClient<tonic::transport::Channel>>,
}

impl Checker {
    fn new(app_addr: SocketAddr, service: String, check: &Check) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = Client::builder(TokioExecutor::new()).build(connector);
        let grpc = match check {
            Check::Grpc(_) => tonic::transport::Endpoint::from_shared(format!("http://{app_addr}"))
                .ok()
                .map(|e| HealthClient::new(e.connect_lazy())),
            Check::Http(_) => None,
        };
        Checker {
            app_addr,
            service,
            http,
            grpc,
        }
    }

    /// One check: `Ok` passes, `Err` says why not.
    async fn check(&self, check: &Check) -> Result<(), String> {
        match check {
            Check::Http(path) => {
                let request = http::Request::get(format!("http://{}{path}", self.app_addr))
                    .header(http::header::HOST, &self.service)
                    .header(http::header::USER_AGENT, "sinew-health")
                    .body(Empty::new())
                    .map_err(|e| e.to_string())?;
                let response = self
                    .http
                    .request(request)
                    .await
                    .map_err(|e| e.to_string())?;
                let status = response.status();
                // Read the (small) body so the connection is reused.
                let _ = response.into_body().collect().await;
                if status.is_success() || status.is_redirection() {
                    Ok(())
                } else {
                    Err(format!("GET {path} answered {status}"))
                }
            }
            Check::Grpc(name) => {
                let mut client = self.grpc.clone().ok_or("no gRPC channel")?;
                let response = client
                    .check(HealthCheckRequest {
                        service: name.clone(),
                    })
                    .await
                    .map_err(|s| format!("Check: {}: {}", s.code(), s.message()))?;
                match response.into_inner().status() {
                    ServingStatus::Serving => Ok(()),
                    other => Err(format!("Check answered {}", other.as_str_name())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_result_decides_then_thresholds_apply() {
        let mut t = Tracker::new(2, 3);
        assert_eq!(t.on_result(true), Some(true));
        assert_eq!(t.on_result(false), None);
        assert_eq!(t.on_result(false), None);
        assert_eq!(t.on_result(true), None, "a pass breaks the streak");
        assert_eq!(t.on_result(false), None);
        assert_eq!(t.on_result(false), None);
        assert_eq!(t.on_result(false), Some(false), "three in a row");
        assert_eq!(t.on_result(false), None, "no change, no report");
        assert_eq!(t.on_result(true), None);
        assert_eq!(t.on_result(true), Some(true), "two passes in a row");
    }

    #[test]
    fn an_app_that_is_not_up_yet_is_unhealthy_after_one_check() {
        let mut t = Tracker::new(1, 3);
        assert_eq!(t.on_result(false), Some(false));
        assert_eq!(t.on_result(true), Some(true));
    }

    #[test]
    fn thresholds_of_zero_count_as_one() {
        let mut t = Tracker::new(0, 0);
        assert_eq!(t.on_result(true), Some(true));
        assert_eq!(t.on_result(false), Some(false));
    }
}
