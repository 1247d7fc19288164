//! `/metrics` of the sidecar and the control plane pass Prometheus's own checker,
//! `promtool check metrics` (Debian's `prometheus` package; `.ci/run` installs it), after
//! enough traffic that most series exist: requests through the mesh, a refusal, an event
//! published and delivered, one dead-lettered, one published to a topic nobody subscribes.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sinew_e2e::*;
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `promtool check metrics` on `text`: (success, what it printed).
fn promtool(text: &str) -> (bool, String) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "promtool is required by this test and could not be run ({e}): install Debian's \
             `prometheus` package (`apt-get install prometheus`); .ci/run does"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), said)
}

async fn scrape(client: &HttpClient, addr: SocketAddr) -> String {
    let answer = get(client, addr, "localhost", "/metrics").await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.text()
}

async fn publish(client: &HttpClient, outbound: SocketAddr, topic: &str, id: &str) -> u16 {
    let request = http::Request::post(format!("http://{outbound}/v1/events/{topic}"))
        .header("content-type", "text/plain")
        .header("ce-id", id)
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .unwrap()
        .unwrap();
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    status
}

/// The metric names a scrape declares (`# TYPE <name> <type>`).
fn declared(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Checks one scrape: promtool is silent and content, and the README's "Metrics" section
/// names every metric it declares.
fn check(what: &str, text: &str, readme_metrics: &str) {
    let names = declared(text);
    assert!(!names.is_empty(), "{what}: no metrics at all:\n{text}");
    let (ok, said) = promtool(text);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics on {what}'s /metrics: success {ok}, complaints:\n{said}\n--- the scrape:\n{text}"
    );
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !readme_metrics.contains(&format!("`{n}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: README's Metrics section does not name {missing:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_and_control_plane_metrics_pass_promtool() {
    let p = pair("metrics-lint", 1).await;
    p.apply(
        "kind: Subscription\nname: orders-created\nspec:\n  topic: order.created\n  service: orders\n  delivery: {max_attempts: 3, backoff: {base: 10ms, max: 50ms}}\n---\n\
         kind: Subscription\nname: orders-refused\nspec:\n  topic: order.refused\n  service: orders\n  path: /status/400\n",
    )
    .await;
    let outbound = p.web.addr("outbound");
    let web_admin = p.web.addr("admin");
    for _ in 0..5 {
        let answer = get(&p.client, outbound, "orders", "/whoami").await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let answer = get(&p.client, outbound, "orders", "/status/503")
        .await
        .unwrap();
    assert_eq!(answer.status, 503);
    let answer = get(&p.client, outbound, "nosuchservice", "/")
        .await
        .unwrap();
    assert_eq!(answer.status, 404);
    assert_eq!(
        publish(&p.client, outbound, "order.created", "e-1").await,
        202
    );
    assert_eq!(
        publish(&p.client, outbound, "order.refused", "e-2").await,
        202
    );
    assert_eq!(
        publish(&p.client, outbound, "nobody.listens", "e-3").await,
        202
    );
    wait_until(
        "the event delivered and the other dead-lettered",
        Duration::from_secs(30),
        || async {
            metric(&p.client, web_admin, "sinew_events_delivered_total").await >= 1.0
                && metric(&p.client, web_admin, "sinew_events_dead_lettered_total").await >= 1.0
        },
    )
    .await;

    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let section = readme
        .split("\n## Metrics\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a `## Metrics` section");

    let web = scrape(&p.client, web_admin).await;
    for name in [
        "sinew_requests_total",
        "sinew_request_duration_seconds",
        "sinew_events_published_total",
        "sinew_events_delivered_total",
        "sinew_events_dead_lettered_total",
        "sinew_event_delivery_seconds",
        "sinew_outbox_events",
    ] {
        assert!(
            declared(&web).iter().any(|n| n == name),
            "web's scrape has {name}:\n{web}"
        );
    }
    check("the web sidecar", &web, section);
    let orders = scrape(&p.client, p.orders[0].1.addr("admin")).await;
    check("the orders sidecar", &orders, section);
    let control = scrape(&p.client, p.mesh.http).await;
    assert!(
        declared(&control)
            .iter()
            .any(|n| n == "sinew_control_sidecars_connected"),
        "{control}"
    );
    check("the control plane", &control, section);
}
