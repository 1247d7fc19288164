//! The events accounting (embedded outbox) end to end: every stored byte counts against the
//! outbox bound, each attribute has a size cap, dead letters have their own bound so one
//! subscriber refusing everything cannot block publishes to other topics, and topics without
//! a subscription share one metric label.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use std::net::SocketAddr;
use std::time::Duration;

/// `POST /v1/events/<topic>` (binary mode, empty data) with `headers`.
async fn publish(
    client: &HttpClient,
    outbound: SocketAddr,
    topic: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut all = vec![("content-type", "text/plain")];
    all.extend_from_slice(headers);
    post(client, outbound, &format!("/v1/events/{topic}"), &all, "").await
}

/// A control plane with `policy`, one `billing` subscriber, and the publisher `orders`, every
/// sidecar started with `flags` (and on NATS JetStream with `nats`).
struct Setup {
    mesh: Mesh,
    _nats: Option<Nats>,
    client: HttpClient,
    billing_app: Proc,
    billing: Proc,
    _orders_app: Proc,
    orders: Proc,
}

async fn setup(test: &str, policy: &str, flags: &[&str], nats: bool) -> Setup {
    let mesh = Mesh::start(test);
    let nats = nats.then(|| Nats::start(test, mesh.dir()));
    let mut all: Vec<String> = nats.as_ref().map(Nats::sidecar_flags).unwrap_or_default();
    all.extend(flags.iter().map(|f| f.to_string()));
    let flags: Vec<&str> = all.iter().map(String::as_str).collect();
    let client = http_client();
    let out = mesh.apply(policy);
    assert!(out.status.success(), "{out:?}");
    let billing_app = mesh.app("billing-1");
    let billing = mesh.sidecar("billing-1", "billing", billing_app.addr("http"), &flags);
    let orders_app = mesh.app("orders-1");
    let orders = mesh.sidecar("orders-1", "orders", orders_app.addr("http"), &flags);
    wait_ready(&client, &billing).await;
    wait_ready(&client, &orders).await;
    wait_endpoints(&client, &orders, "billing", 1).await;
    Setup {
        mesh,
        _nats: nats,
        client,
        billing_app,
        billing,
        _orders_app: orders_app,
        orders,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attributes_count_against_the_outbox_and_have_caps() {
    let s = setup(
        "events-bytes",
        "kind: Subscription\nname: billing-orders\nspec:\n  topic: order.created\n  service: billing\n",
        &["--outbox-max-bytes", "20000"],
        false,
    )
    .await;
    // The subscriber is down for now: everything published stays pending.
    let answer = get(
        &s.client,
        s.billing_app.addr("http"),
        "app",
        "/control/event-status?code=503",
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
    let outbound = s.orders.addr("outbound");

    // An attribute over its cap: 400, naming it.
    let subject = "s".repeat(2000);
    let answer = publish(
        &s.client,
        outbound,
        "order.created",
        &[("ce-subject", &subject)],
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(answer.header("sinew-error"), Some("attribute-too-large"));
    assert!(answer.text().contains("`subject`"), "{}", answer.text());

    // No data, a kilobyte of subject each: the 20,000-byte bound is reached all the same.
    let subject = "s".repeat(1000);
    let mut accepted = 0;
    let mut full = None;
    for i in 0..40 {
        let id = format!("e-{i}");
        let answer = publish(
            &s.client,
            outbound,
            "order.created",
            &[("ce-subject", &subject), ("ce-id", &id)],
        )
        .await;
        match answer.status {
            202 => accepted += 1,
            _ => {
                full = Some(answer);
                break;
            }
        }
    }
    let full = full.unwrap_or_else(|| {
        panic!("40 events of 1 KB attributes were all accepted under a 20,000-byte bound")
    });
    assert_eq!(full.status, 503, "{}", full.text());
    assert_eq!(full.header("sinew-error"), Some("outbox-full"));
    assert!((10..=19).contains(&accepted), "{accepted} accepted");
    println!("{accepted} events of 1 KB attributes filled 20,000 bytes");

    // Topics nobody subscribes to: accepted, counted under one label.
    for i in 0..30 {
        let answer = publish(&s.client, outbound, &format!("random-{i}.x"), &[]).await;
        assert_eq!(answer.status, 202, "{}", answer.text());
    }
    let text = get(&s.client, s.orders.addr("admin"), "localhost", "/metrics")
        .await
        .unwrap()
        .text();
    assert!(
        !text.contains("topic=\"random-"),
        "a series per unsubscribed topic:\n{text}"
    );
    assert!(
        text.contains("sinew_events_published_total{topic=\"other\"} 30"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "sinew_events_published_total{{topic=\"order.created\"}} {accepted}"
        )),
        "{text}"
    );
    drop(s.mesh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_refusing_everything_does_not_block_other_topics() {
    dead_letters_have_their_own_bound(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_refusing_everything_does_not_block_other_topics_nats() {
    dead_letters_have_their_own_bound(true).await
}

/// A counter summed over both sidecars (embedded: the publisher's sidecar delivers; NATS:
/// the subscriber's).
async fn both(s: &Setup, name: &str) -> f64 {
    metric(&s.client, s.orders.addr("admin"), name).await
        + metric(&s.client, s.billing.addr("admin"), name).await
}

/// The dead letters the publisher's sidecar lists: (how many, their ids sorted).
async fn dead_letters(s: &Setup) -> (u64, Vec<String>) {
    let answer = get(&s.client, s.orders.addr("admin"), "localhost", "/events")
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    let mut ids: Vec<String> = json["dead_letter_entries"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["event_id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    (json["dead_letters"].as_u64().unwrap_or(0), ids)
}

async fn dead_letters_have_their_own_bound(nats: bool) {
    let policy = "kind: Subscription\nname: billing-refused\nspec:\n  topic: order.refused\n  service: billing\n  path: /status/400\n---\n\
                  kind: Subscription\nname: billing-orders\nspec:\n  topic: order.created\n  service: billing\n";
    let s = setup(
        if nats {
            "events-dead-bound-nats"
        } else {
            "events-dead-bound"
        },
        policy,
        &["--outbox-max-events", "5", "--dead-letters-max-events", "3"],
        nats,
    )
    .await;
    let outbound = s.orders.addr("outbound");
    // Ten events the subscriber refuses (400: dead-lettered at once), one at a time: with
    // dead letters counted against the outbox's 5, the sixth publish would be refused.
    for i in 0..10 {
        let id = format!("r-{i}");
        let answer = publish(&s.client, outbound, "order.refused", &[("ce-id", &id)]).await;
        assert_eq!(answer.status, 202, "publish {i}: {}", answer.text());
        let what = format!("event {i} dead-lettered");
        wait_until(&what, Duration::from_secs(30), || async {
            both(&s, "sinew_events_dead_lettered_total").await >= f64::from(i + 1)
        })
        .await;
    }
    // The dead letters kept: the newest three (the counter moves before the outbox commits
    // the last one, so wait for it).
    let want = vec!["r-7".to_string(), "r-8".to_string(), "r-9".to_string()];
    wait_until(
        "the newest three dead letters",
        Duration::from_secs(10),
        || async { dead_letters(&s).await == (3, want.clone()) },
    )
    .await;
    if !nats {
        // (JetStream drops them itself: `discard: old` on the dead-letter stream.)
        assert_eq!(
            metric(
                &s.client,
                s.orders.addr("admin"),
                "sinew_dead_letters_evicted_total"
            )
            .await,
            7.0
        );
    }
    // Another topic still publishes and delivers.
    let answer = publish(&s.client, outbound, "order.created", &[("ce-id", "c-1")]).await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    wait_until(
        "order.created delivered",
        Duration::from_secs(30),
        || async { both(&s, "sinew_events_delivered_total").await >= 1.0 },
    )
    .await;
    drop(s.mesh);
}
