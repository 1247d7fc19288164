//! Whether the health-checked services of an `up` file serve: a sidecar is ready as soon as
//! it has its configuration, but the control plane hands callers only the instances whose app
//! passes its checks, so `mesh ready` waits for the control plane to list a serving instance
//! of each such service, and otherwise says which instance fails which check.

use super::file::ServiceSection;
use super::{Plan, Probe, probe};
use anyhow::anyhow;
use std::time::Duration;
use tokio::time::{Instant, sleep};

/// Waits until every service with a health check has an instance the control plane lists as
/// connected and serving; past `deadline`, names each service that has none and why.
pub async fn wait(
    plan: &Plan,
    probes: &[Probe],
    admin: &crate::admin::Target,
    deadline: Instant,
    limit: Duration,
) -> anyhow::Result<()> {
    let checked: Vec<&ServiceSection> = plan
        .file
        .services
        .iter()
        .filter(|s| s.health.is_some())
        .collect();
    if checked.is_empty() {
        return Ok(());
    }
    loop {
        let (missing, error) = match crate::admin::list_services(admin).await {
            Ok(services) => {
                let serving = |name: &str| {
                    services.iter().any(|s| {
                        s.name == name && s.instances.iter().any(|i| i.connected && i.serving)
                    })
                };
                let missing: Vec<&ServiceSection> = checked
                    .iter()
                    .copied()
                    .filter(|s| !serving(&s.name))
                    .collect();
                (missing, None)
            }
            Err(e) => (checked.clone(), Some(e)),
        };
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            if let Some(e) = error {
                return Err(e.context(format!(
                    "not ready after {limit:?}: cannot ask the control plane which instances serve"
                )));
            }
            let mut list = Vec::new();
            for service in missing {
                list.push(not_serving(plan, probes, service).await);
            }
            return Err(anyhow!("not ready after {limit:?}: {}", list.join("; ")));
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Why a health-checked service has no serving instance, per instance: an HTTP check is
/// asked again here (its answer now); a gRPC check's reason is the sidecar's last verdict
/// in its log.
async fn not_serving(plan: &Plan, probes: &[Probe], service: &ServiceSection) -> String {
    let check = service.health.as_deref().unwrap_or_default();
    let mut why = Vec::new();
    for i in 1..=service.instances {
        let node = format!("{}-{i}", service.name);
        let app = format!("app {node}");
        let app_addr = probes.iter().find_map(|p| match p {
            Probe::App { name, addr } if *name == app => Some(*addr),
            _ => None,
        });
        let reason = match (app_addr, check.starts_with('/')) {
            (Some(addr), true) => match probe::http_status(addr, check).await {
                Ok(status) if (200..400).contains(&status) => format!(
                    "GET {check} answers {status} now, but the control plane does not list it as serving yet"
                ),
                Ok(status) => format!(
                    "GET {check} answered {status} {}",
                    http::StatusCode::from_u16(status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or_default()
                ),
                Err(e) => format!("GET {check}: {e}"),
            },
            _ => {
                let log = plan.log(&format!("sidecar {node}"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                last_health_failure(&text)
                    .unwrap_or("no health check passed yet")
                    .to_string()
            }
        };
        why.push(format!("{node}: {}", reason.trim_end()));
    }
    format!(
        "service {} has no serving instance (health: {check}): {}; logs in {}",
        service.name,
        why.join(", "),
        plan.state.join("logs").display()
    )
}

/// The reason of a sidecar's last "the app is unhealthy (...)" log line, unless a "healthy
/// again" line came after it.
fn last_health_failure(log: &str) -> Option<&str> {
    const UNHEALTHY: &str = "the app is unhealthy (";
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(UNHEALTHY) || l.contains("the app is healthy again"))?;
    let start = line.find(UNHEALTHY)? + UNHEALTHY.len();
    let rest = &line[start..];
    Some(
        rest.rfind("); withdrawing")
            .map_or(rest, |end| &rest[..end]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_health_verdict_comes_from_the_sidecar_log() {
        let log = "2026-12-08T00:00:00Z  WARN sinew_sidecar::health: the app is unhealthy (GET /healthz answered 404 Not Found); withdrawing\n";
        assert_eq!(
            last_health_failure(log),
            Some("GET /healthz answered 404 Not Found")
        );
        let healed = format!(
            "{log}2026-12-08T00:00:01Z  INFO sinew_sidecar::health: the app is healthy again; serving\n"
        );
        assert_eq!(last_health_failure(&healed), None);
        assert_eq!(last_health_failure("listening\n"), None);
    }
}
