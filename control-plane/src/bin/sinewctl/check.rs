//! `sinewctl check`: exits non-zero, and says why, when the mesh is heading for an outage that
//! has not happened yet. Meant for cron, CI and alerting scripts; `sinewctl status` shows the
//! same facts as a table.
//!
//! It fails when a sidecar's certificate has less than 20% of its life left (renewal, due at
//! about 70%, has been failing), when the mesh CA expires within 30 days (every certificate
//! ends with it), or when a sidecar is disconnected or refusing (NACKing) its configuration.

use crate::admin::{Client, Target};
use sinew_proto::v1::{StatusRequest, StatusResponse};
use std::process::ExitCode;

/// A certificate with less life left than this fraction is a problem.
pub const MIN_LIFE_LEFT: f64 = 0.2;
/// A CA expiring sooner than this (seconds) is a problem.
pub const CA_MIN_LEFT_SECS: i64 = 30 * 24 * 3600;

/// What `check` found: problems (each fails the check) and passed checks, one line each.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub problems: Vec<String>,
    pub passed: Vec<String>,
}

/// Judges a status answer at `now_unix`.
pub fn judge(status: &StatusResponse, now_unix: i64) -> Findings {
    let mut f = Findings::default();
    match status.ca_not_after_unix {
        Some(not_after) if not_after - now_unix < CA_MIN_LEFT_SECS => f.problems.push(format!(
            "the mesh CA expires {} (less than 30 days): every certificate ends with it",
            remaining(now_unix, not_after)
        )),
        Some(not_after) => f.passed.push(format!(
            "the mesh CA expires {}",
            remaining(now_unix, not_after)
        )),
        None => f
            .problems
            .push("the control plane does not report its CA's expiry (it predates `check`)".into()),
    }

    let mut connected = 0;
    let mut fresh = 0;
    let mut unreported = Vec::new();
    for s in &status.sidecars {
        let who = format!("sidecar {} ({})", s.node_id, s.service);
        if s.connected {
            connected += 1;
        } else {
            f.problems
                .push(format!("{who} is disconnected from the control plane"));
        }
        if s.state == "NACK" {
            f.problems.push(format!(
                "{who} refuses its configuration (NACK of v{}: {})",
                s.last_nack_version,
                s.last_nack_error.lines().next().unwrap_or_default()
            ));
        }
        match (s.certificate_not_before_unix, s.certificate_not_after_unix) {
            (Some(not_before), Some(not_after)) => {
                let life = (not_after - not_before).max(1) as f64;
                let left = (not_after - now_unix) as f64 / life;
                if left < MIN_LIFE_LEFT {
                    f.problems.push(format!(
                        "{who}: its certificate expires {} ({:.0}% of its life left; renewal \
                         is due at 70%, so it is failing)",
                        remaining(now_unix, not_after),
                        (left * 100.0).max(0.0)
                    ));
                } else {
                    fresh += 1;
                }
            }
            _ => unreported.push(s.node_id.as_str()),
        }
    }
    let total = status.sidecars.len();
    if connected == total {
        f.passed.push(format!("{total} sidecars connected"));
    }
    if !status.sidecars.iter().any(|s| s.state == "NACK") {
        f.passed
            .push("no sidecar refuses its configuration".to_string());
    }
    if fresh > 0 && fresh + unreported.len() == total {
        f.passed.push(format!(
            "{fresh} sidecar certificates have at least {:.0}% of their life left",
            MIN_LIFE_LEFT * 100.0
        ));
    }
    if !unreported.is_empty() {
        // Not a failure: sidecars that predate reporting, or that just connected.
        f.passed.push(format!(
            "no certificate reported by {} (older sidecars?)",
            unreported.join(", ")
        ));
    }
    f
}

/// `in 9m58s`, `in 2d3h`, or `3s ago` (already past): how far `then` is from `now`.
pub fn remaining(now_unix: i64, then_unix: i64) -> String {
    let delta = then_unix - now_unix;
    let text = crate::table::span(delta.unsigned_abs());
    if delta < 0 {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

/// `sinewctl check`: one line per check (`ok` or `FAIL`), then the verdict; exit 1 on any
/// problem.
pub async fn run(target: &Target) -> anyhow::Result<ExitCode> {
    let mut client = Client::connect(target).await?;
    let request = client.request(StatusRequest {});
    let status = client
        .inner
        .status(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let findings = judge(&status, now);
    print!("{}", render(&findings));
    Ok(if findings.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub fn render(f: &Findings) -> String {
    let mut out = String::new();
    for p in &f.problems {
        out.push_str(&format!("FAIL  {p}\n"));
    }
    for p in &f.passed {
        out.push_str(&format!("ok    {p}\n"));
    }
    match f.problems.len() {
        0 => out.push_str("check passed\n"),
        1 => out.push_str("check failed: 1 problem\n"),
        n => out.push_str(&format!("check failed: {n} problems\n")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sinew_proto::v1::SidecarStatus;

    const NOW: i64 = 1_800_000_000;
    const DAY: i64 = 86_400;

    fn sidecar(node: &str, not_before: i64, not_after: i64) -> SidecarStatus {
        SidecarStatus {
            node_id: node.into(),
            service: node.split('-').next().unwrap_or_default().into(),
            connected: true,
            state: "ACK".into(),
            certificate_not_before_unix: Some(not_before),
            certificate_not_after_unix: Some(not_after),
            ..Default::default()
        }
    }

    fn healthy() -> StatusResponse {
        StatusResponse {
            version: 3,
            sidecars: vec![
                sidecar("web-1", NOW - 3600, NOW + 20 * 3600),
                sidecar("orders-1", NOW - 60, NOW + DAY - 60),
            ],
            ca_not_before_unix: Some(NOW - DAY),
            ca_not_after_unix: Some(NOW + 3650 * DAY),
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_mesh_passes() {
        let f = judge(&healthy(), NOW);
        assert_eq!(f.problems, Vec::<String>::new());
        assert_eq!(
            render(&f),
            "ok    the mesh CA expires in 3650d0h\n\
             ok    2 sidecars connected\n\
             ok    no sidecar refuses its configuration\n\
             ok    2 sidecar certificates have at least 20% of their life left\n\
             check passed\n"
        );
    }

    #[test]
    fn each_problem_fails_with_its_reason() {
        let mut s = healthy();
        s.ca_not_after_unix = Some(NOW + 600);
        // 19% left of a 24 h certificate.
        s.sidecars[0] = sidecar("web-1", NOW - 81 * DAY / 100, NOW + 19 * DAY / 100);
        s.sidecars[1].connected = false;
        s.sidecars[1].state = "NACK".into();
        s.sidecars[1].last_nack_version = 7;
        s.sidecars[1].last_nack_error = "spec.timeout: bad\nmore".into();
        let f = judge(&s, NOW);
        assert_eq!(
            f.problems,
            [
                "the mesh CA expires in 10m0s (less than 30 days): every certificate ends with it",
                "sidecar web-1 (web): its certificate expires in 4h33m (19% of its life left; \
                 renewal is due at 70%, so it is failing)",
                "sidecar orders-1 (orders) is disconnected from the control plane",
                "sidecar orders-1 (orders) refuses its configuration (NACK of v7: spec.timeout: bad)",
            ]
        );
        assert!(render(&f).ends_with("check failed: 4 problems\n"));
        // Expired, and a CA 29 days from its end.
        s = healthy();
        s.ca_not_after_unix = Some(NOW + 29 * DAY);
        s.sidecars[0] = sidecar("web-1", NOW - 100, NOW - 10);
        let f = judge(&s, NOW);
        assert!(f.problems[0].contains("in 29d0h"), "{:?}", f.problems);
        assert!(
            f.problems[1].contains("expires 10s ago (0% of"),
            "{:?}",
            f.problems
        );
    }

    #[test]
    fn sidecars_that_report_no_certificate_are_noted_not_failed() {
        let mut s = healthy();
        s.sidecars[1].certificate_not_before_unix = None;
        s.sidecars[1].certificate_not_after_unix = None;
        let f = judge(&s, NOW);
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert!(
            f.passed
                .contains(&"no certificate reported by orders-1 (older sidecars?)".to_string())
        );
    }

    #[test]
    fn remaining_reads_both_ways() {
        assert_eq!(remaining(100, 100), "in 0s");
        assert_eq!(remaining(100, 700), "in 10m0s");
        assert_eq!(remaining(700, 100), "10m0s ago");
        assert_eq!(remaining(0, 2 * DAY + 3 * 3600), "in 2d3h");
    }
}
