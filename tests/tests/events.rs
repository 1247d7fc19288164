//! Event fan-out end to end, the same suite against both backends: the embedded outbox, and
//! NATS JetStream (a real `nats-server`, see `Nats` in the harness). Real control plane, real
//! sidecars, real subscriber apps (sinew-testapp's `/events/...` sink), publishes over HTTP to
//! the publisher's sidecar.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use sinew_e2e::*;
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Embedded,
    Nats,
}

/// Runs a test body against both backends, as `<test>::embedded` and `<test>::nats`.
macro_rules! on_both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::Backend::Embedded).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                super::$name(super::Backend::Nats).await
            }
        }
    };
}

/// A mesh with a publisher (`orders`, one instance) and subscriber services.
struct EventMesh {
    mesh: Mesh,
    /// Every sidecar's extra flags: the backend's, then the test's.
    flags: Vec<String>,
    _nats: Option<Nats>,
    client: HttpClient,
    publisher: Proc,
    _publisher_app: Proc,
    /// Per subscriber service: (app, sidecar) per instance.
    subscribers: BTreeMap<String, Vec<(Proc, Proc)>>,
}

impl EventMesh {
    async fn start(
        backend: Backend,
        test: &str,
        services: &[(&str, usize)],
        policy: &str,
        extra: &[&str],
    ) -> Self {
        let mesh = Mesh::start(test);
        let nats = (backend == Backend::Nats).then(|| Nats::start(test, mesh.dir()));
        let mut flags = nats.as_ref().map(Nats::sidecar_flags).unwrap_or_default();
        flags.extend(extra.iter().map(|s| s.to_string()));
        let client = http_client();
        let out = mesh.apply(policy);
        assert!(out.status.success(), "{out:?}");
        let mut subscribers = BTreeMap::new();
        for (service, n) in services {
            let mut instances = Vec::new();
            for i in 1..=*n {
                let node = format!("{service}-{i}");
                let app = mesh.app(&node);
                let sidecar = mesh.sidecar(&node, service, app.addr("http"), &strs(&flags));
                instances.push((app, sidecar));
            }
            subscribers.insert(service.to_string(), instances);
        }
        let app = mesh.app("orders-1");
        let publisher = mesh.sidecar("orders-1", "orders", app.addr("http"), &strs(&flags));
        wait_ready(&client, &publisher).await;
        for (service, instances) in &subscribers {
            for (_, sidecar) in instances {
                wait_ready(&client, sidecar).await;
            }
            wait_endpoints(&client, &publisher, service, instances.len()).await;
        }
        EventMesh {
            mesh,
            flags,
            _nats: nats,
            client,
            publisher,
            _publisher_app: app,
            subscribers,
        }
    }

    /// A sidecar for `service` with this mesh's flags.
    fn sidecar(&self, node: &str, service: &str, app: &Proc) -> Proc {
        self.mesh
            .sidecar(node, service, app.addr("http"), &strs(&self.flags))
    }

    /// Events the backend holds undelivered, as the publisher's sidecar reports them on
    /// `/events` (embedded: its outbox; NATS: the shared stream, asked at once).
    async fn pending(&self) -> f64 {
        let answer = get(
            &self.client,
            self.publisher.addr("admin"),
            "localhost",
            "/events",
        )
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        v["outbox_events"].as_f64().unwrap()
    }

    async fn wait_pending(&self, what: &str, check: impl Fn(f64) -> bool) {
        wait_until(what, Duration::from_secs(30), || async {
            check(self.pending().await)
        })
        .await;
    }

    /// A delivery counter summed over every sidecar (the publisher's delivers embedded
    /// events; the subscribers' deliver NATS events).
    async fn deliveries(&self, counter: &str) -> f64 {
        let mut sum = metric(&self.client, self.publisher.addr("admin"), counter).await;
        for instances in self.subscribers.values() {
            for (_, sidecar) in instances {
                sum += metric(&self.client, sidecar.addr("admin"), counter).await;
            }
        }
        sum
    }

    async fn retried(&self) -> f64 {
        self.deliveries("sinew_events_retried_total").await
    }

    fn apps(&self, service: &str) -> impl Iterator<Item = &Proc> {
        self.subscribers[service].iter().map(|(app, _)| app)
    }

    /// Sets every app of `service` to answer events with `code`.
    async fn answer_with(&self, service: &str, code: u16) {
        for app in self.apps(service) {
            let path = format!("/control/event-status?code={code}");
            let answer = get(&self.client, app.addr("http"), "app", &path)
                .await
                .unwrap();
            assert_eq!(answer.status, 200);
        }
    }

    /// What each app of `service` accepted: (id, key, body) in arrival order, per instance.
    async fn received(&self, service: &str) -> Vec<Vec<(String, String, String)>> {
        let mut out = Vec::new();
        for app in self.apps(service) {
            let answer = get(&self.client, app.addr("http"), "app", "/control/received")
                .await
                .unwrap();
            let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
            let accepted = json["accepted"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let s = |i: usize| e[i].as_str().unwrap_or_default().to_string();
                    (s(0), s(1), s(2))
                })
                .collect();
            out.push(accepted);
        }
        out
    }

    /// What each app of `service` accepted as (when in ns, key, body), per instance.
    async fn received_at(&self, service: &str) -> Vec<Vec<(u128, String, String)>> {
        let mut out = Vec::new();
        for app in self.apps(service) {
            let answer = get(&self.client, app.addr("http"), "app", "/control/received")
                .await
                .unwrap();
            let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
            let entries = json["accepted"].as_array().unwrap();
            out.push(
                entries
                    .iter()
                    .map(|e| {
                        let s = |i: usize| e[i].as_str().unwrap_or_default().to_string();
                        (s(3).parse().unwrap(), s(1), s(2))
                    })
                    .collect(),
            );
        }
        out
    }

    /// Distinct ids `service` accepted, and how many deliveries were duplicates.
    async fn distinct(&self, service: &str) -> (HashSet<String>, usize) {
        let mut ids = HashSet::new();
        let mut total = 0;
        for instance in self.received(service).await {
            total += instance.len();
            ids.extend(instance.into_iter().map(|(id, _, _)| id));
        }
        let duplicates = total - ids.len();
        (ids, duplicates)
    }

    async fn wait_received(&self, service: &str, n: usize, within: Duration) {
        let what = format!("{service} to receive {n} distinct events");
        wait_until(&what, within, || async {
            self.distinct(service).await.0.len() >= n
        })
        .await;
    }
}

fn strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// Publishes `n` events in batches of 100 (ids `<prefix>-<i>`); asserts each batch is 202.
async fn publish_batches(
    client: &HttpClient,
    outbound: SocketAddr,
    topic: &str,
    prefix: &str,
    n: usize,
) {
    for start in (0..n).step_by(100) {
        let batch: Vec<serde_json::Value> = (start..(start + 100).min(n))
            .map(|i| serde_json::json!({"id": format!("{prefix}-{i}"), "data": {"n": i}}))
            .collect();
        let answer = post(
            client,
            outbound,
            &format!("/v1/events/{topic}:batch"),
            &[("content-type", "application/cloudevents-batch+json")],
            serde_json::to_vec(&batch).unwrap(),
        )
        .await;
        assert_eq!(answer.status, 202, "{}", answer.text());
    }
}

fn subscription(name: &str, topic: &str, service: &str, delivery: &str) -> String {
    format!(
        "kind: Subscription\nname: {name}\nspec:\n  topic: {topic}\n  service: {service}\n  delivery: {delivery}\n---\n"
    )
}

const FAST: &str = "{max_attempts: 1000, backoff: {base: 20ms, max: 300ms}, timeout: 2s}";

on_both_backends!(fan_out_to_every_service_and_survive_a_publisher_kill);
/// Tests 1 and 2: 10,000 events fan out to two services of two instances each; every
/// service gets every id, its instances share the load. Then, with thousands pending, the
/// publisher's sidecar is SIGKILLed and restarted: nothing is lost.
async fn fan_out_to_every_service_and_survive_a_publisher_kill(backend: Backend) {
    let policy = subscription("billing-orders", "order.created", "billing", FAST)
        + &subscription("email-orders", "order.created", "email", FAST);
    let mut m = EventMesh::start(
        backend,
        "events-fanout",
        &[("billing", 2), ("email", 2)],
        &policy,
        &[],
    )
    .await;
    let outbound = m.publisher.addr("outbound");
    let started = std::time::Instant::now();
    publish_batches(&m.client, outbound, "order.created", "a", 10_000).await;
    let published = started.elapsed();
    for service in ["billing", "email"] {
        m.wait_received(service, 10_000, Duration::from_secs(120))
            .await;
    }
    let delivered = started.elapsed();
    for service in ["billing", "email"] {
        let (ids, duplicates) = m.distinct(service).await;
        let want: HashSet<String> = (0..10_000).map(|i| format!("a-{i}")).collect();
        assert_eq!(ids, want, "{service} got exactly the published ids");
        let per_instance: Vec<usize> = m.received(service).await.iter().map(Vec::len).collect();
        println!("{service}: 10000 ids, {duplicates} duplicates, per instance {per_instance:?}");
        assert!(
            per_instance.iter().all(|n| *n > 0),
            "both instances of {service} share the load: {per_instance:?}"
        );
    }
    println!(
        "published 10000 in {published:?}; all delivered to both services after {delivered:?}"
    );

    // Test 2: billing refuses for now, so thousands stay pending; kill -9 the publisher.
    m.answer_with("billing", 503).await;
    publish_batches(&m.client, outbound, "order.created", "b", 3000).await;
    m.wait_pending("thousands pending", |p| p >= 1000.0).await;
    println!("pending before SIGKILL: {}", m.pending().await);
    m.publisher.kill();
    let app = m.mesh.app("orders-1b");
    m.publisher = m.sidecar("orders-1", "orders", &app);
    m._publisher_app = app;
    // And one subscriber's sidecar, mid-retry.
    let (app, sidecar) = &mut m.subscribers.get_mut("billing").unwrap()[0];
    sidecar.kill();
    *sidecar = m
        .mesh
        .sidecar("billing-1", "billing", app.addr("http"), &strs(&m.flags));
    wait_ready(&m.client, &m.subscribers["billing"][0].1).await;
    wait_ready(&m.client, &m.publisher).await;
    m.answer_with("billing", 200).await;
    m.wait_received("billing", 13_000, Duration::from_secs(120))
        .await;
    m.wait_received("email", 13_000, Duration::from_secs(120))
        .await;
    for service in ["billing", "email"] {
        let (ids, duplicates) = m.distinct(service).await;
        let missing = (0..3000)
            .map(|i| format!("b-{i}"))
            .filter(|id| !ids.contains(id))
            .count();
        println!(
            "{service} after the kill: {} ids, {duplicates} duplicates, {missing} missing",
            ids.len()
        );
        assert_eq!(missing, 0);
    }
    m.wait_pending("the outbox to empty", |p| p == 0.0).await;
}

on_both_backends!(a_subscriber_down_for_a_while_gets_everything_after);
/// Test 3: a subscriber that is down for a while gets everything once it is back.
async fn a_subscriber_down_for_a_while_gets_everything_after(backend: Backend) {
    let policy = subscription("billing-orders", "order.created", "billing", FAST);
    let mut m = EventMesh::start(backend, "events-down", &[("billing", 1)], &policy, &[]).await;
    let outbound = m.publisher.addr("outbound");
    // The subscriber's sidecar goes away (its instance leaves the endpoint set).
    let mut instances = m.subscribers.remove("billing").unwrap();
    let (app, mut sidecar) = instances.remove(0);
    sidecar.terminate();
    wait_endpoints(&m.client, &m.publisher, "billing", 0).await;
    publish_batches(&m.client, outbound, "order.created", "d", 300).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Held while no one can take them.
    m.wait_pending("300 pending", |p| p >= 300.0).await;
    let sidecar = m.sidecar("billing-1", "billing", &app);
    let back = std::time::Instant::now();
    m.subscribers.insert("billing".into(), vec![(app, sidecar)]);
    m.wait_received("billing", 300, Duration::from_secs(30))
        .await;
    println!(
        "all 300 delivered {:?} after the subscriber came back",
        back.elapsed()
    );
    if backend == Backend::Embedded {
        // The publisher's sidecar kept trying; with NATS, nobody pulled while it was down.
        let retried = m.retried().await;
        assert!(retried > 0.0, "deliveries were retried while it was down");
    }
    m.wait_pending("nothing pending", |p| p == 0.0).await;
}

on_both_backends!(dead_letters_are_listed_replayed_and_purged);
/// Test 4: 400 → dead-lettered at once; 503 forever → after max attempts; both listed by
/// `sinewctl events dead-letters`, replayed once the subscribers are fixed, then gone.
async fn dead_letters_are_listed_replayed_and_purged(backend: Backend) {
    let policy = subscription("billing-orders", "order.created", "billing", FAST)
        + &subscription(
            "email-orders",
            "order.created",
            "email",
            "{max_attempts: 3, backoff: {base: 10ms, max: 50ms}}",
        );
    let m = EventMesh::start(
        backend,
        "events-dead",
        &[("billing", 1), ("email", 1)],
        &policy,
        &[],
    )
    .await;
    m.answer_with("billing", 400).await;
    m.answer_with("email", 503).await;
    let outbound = m.publisher.addr("outbound");
    for i in 0..5 {
        let id = format!("dl-{i}");
        let answer = post(
            &m.client,
            outbound,
            "/v1/events/order.created",
            &[("content-type", "text/plain"), ("ce-id", &id)],
            format!("event {i}"),
        )
        .await;
        assert_eq!(answer.status, 202, "{}", answer.text());
    }
    let admin = m.publisher.addr("admin");
    wait_until("10 dead letters", Duration::from_secs(20), || async {
        let answer = get(&m.client, admin, "localhost", "/events").await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        v["dead_letters"].as_u64() == Some(10)
    })
    .await;
    wait_until("the dead-letter gauge", Duration::from_secs(10), || async {
        metric(&m.client, admin, "sinew_dead_letters").await == 10.0
    })
    .await;
    let out = m.mesh.sinewctl(&["events", "dead-letters"]);
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(table.lines().count(), 11, "a header and 10 rows: {table}");
    let billing: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("billing-orders"))
        .collect();
    assert!(
        billing
            .iter()
            .all(|l| l.contains(" 1 ") && l.contains("400")),
        "{billing:?}"
    );
    let email: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("email-orders"))
        .collect();
    assert!(
        email.iter().all(|l| l.contains(" 3 ") && l.contains("503")),
        "{email:?}"
    );
    // The event stays in the dead letters, not in the outbox.
    m.wait_pending("no pending events", |p| p == 0.0).await;

    // Replay needs a filter or --all.
    let out = m.mesh.sinewctl(&["events", "replay"]);
    assert!(!out.status.success());
    // Replayed while billing still refuses: each is dead-lettered once more (not lost, not
    // replayed twice by the same request) and listed again.
    assert_eq!(m.deliveries("sinew_events_dead_lettered_total").await, 10.0);
    let out = m
        .mesh
        .sinewctl(&["events", "replay", "--service", "billing"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("5 dead letters replayed"),
        "{out:?}"
    );
    wait_until(
        "billing's 5 dead again",
        Duration::from_secs(20),
        || async { m.deliveries("sinew_events_dead_lettered_total").await == 15.0 },
    )
    .await;
    wait_until(
        "10 dead letters listed",
        Duration::from_secs(10),
        || async {
            let out = m.mesh.sinewctl(&["events", "dead-letters"]);
            String::from_utf8_lossy(&out.stdout).lines().count() == 11
        },
    )
    .await;
    m.answer_with("billing", 200).await;
    m.answer_with("email", 200).await;
    let out = m
        .mesh
        .sinewctl(&["events", "replay", "--service", "billing"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 dead letters replayed"));
    m.wait_received("billing", 5, Duration::from_secs(20)).await;
    let out = m.mesh.sinewctl(&["events", "dead-letters"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(table.lines().count(), 6, "only email's 5 left: {table}");
    assert!(!table.contains("billing"));
    // Purge one by id, replay the rest by topic.
    let out = m.mesh.sinewctl(&["events", "purge", "--id", "dl-0"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 dead letters purged"),
        "{out:?}"
    );
    let out = m
        .mesh
        .sinewctl(&["events", "replay", "--topic", "order.created"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4 dead letters replayed"),
        "{out:?}"
    );
    m.wait_received("email", 4, Duration::from_secs(20)).await;
    let (ids, _) = m.distinct("email").await;
    assert!(!ids.contains("dl-0") && ids.contains("dl-4"));
    let out = m.mesh.sinewctl(&["events", "dead-letters"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no dead letters"),
        "{out:?}"
    );
}

on_both_backends!(per_key_order_holds_under_concurrency_and_retries);
/// Test 5: events of one key arrive in publish order, even when first deliveries fail.
async fn per_key_order_holds_under_concurrency_and_retries(backend: Backend) {
    let policy = subscription("billing-orders", "order.created", "billing", FAST);
    let m = EventMesh::start(backend, "events-order", &[("billing", 2)], &policy, &[]).await;
    for app in m.apps("billing") {
        get(
            &m.client,
            app.addr("http"),
            "app",
            "/control/event-flaky?percent=30",
        )
        .await
        .unwrap();
    }
    let outbound = m.publisher.addr("outbound");
    let n = 400;
    let mut publishes = Vec::new();
    for i in 0..n {
        let client = m.client.clone();
        let key = format!("key-{}", i % 8);
        // Each key's events are published one after another; keys interleave.
        publishes.push((key, i));
        if publishes.len() == 8 || i == n - 1 {
            let batch = std::mem::take(&mut publishes);
            let mut tasks = Vec::new();
            for (key, i) in batch {
                let client = client.clone();
                tasks.push(tokio::spawn(async move {
                    let answer = post(
                        &client,
                        outbound,
                        "/v1/events/order.created",
                        &[("content-type", "text/plain"), ("sinew-key", &key)],
                        format!("{i}"),
                    )
                    .await;
                    assert_eq!(answer.status, 202, "{}", answer.text());
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    }
    m.wait_received("billing", n, Duration::from_secs(60)).await;
    // Both instances' logs merged by acceptance time (one machine, one clock): per key, the
    // values must come in publish order, whichever instance took each.
    let mut merged: Vec<(u128, String, u64)> = Vec::new();
    for instance in m.received_at("billing").await {
        for (when, key, body) in instance {
            merged.push((when, key, body.parse().unwrap()));
        }
    }
    merged.sort();
    let retried = m.retried().await;
    println!("{} deliveries accepted, {retried} retries", merged.len());
    assert!(
        retried > 0.0,
        "some first deliveries failed and were retried"
    );
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for (_, key, v) in merged {
        if let Some(prev) = last.insert(key.clone(), v) {
            assert!(v > prev, "key {key}: {v} accepted after {prev}");
        }
        *per_key.entry(key).or_default() += 1;
    }
    assert_eq!(per_key.len(), 8);
    assert!(
        per_key.values().all(|c| *c == n / 8),
        "every event once: {per_key:?}"
    );
}

on_both_backends!(subscriptions_follow_policy_and_bad_input_is_refused);
/// Tests 6 and 7: subscriptions follow `sinewctl apply`/`delete` without restarts; bad
/// input gets a clear 4xx and nothing is stored.
async fn subscriptions_follow_policy_and_bad_input_is_refused(backend: Backend) {
    let policy = subscription("billing-orders", "order.created", "billing", FAST);
    let m = EventMesh::start(
        backend,
        "events-policy",
        &[("billing", 1), ("email", 1)],
        &policy,
        &[],
    )
    .await;
    let outbound = m.publisher.addr("outbound");
    let one = |id: &'static str| {
        let client = m.client.clone();
        async move {
            post(
                &client,
                outbound,
                "/v1/events/order.created",
                &[("ce-id", id)],
                "x",
            )
            .await
        }
    };
    let answer = one("p-1").await;
    assert_eq!(answer.status, 202);
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(
        (json["id"].as_str(), json["subscribers"].as_u64()),
        (Some("p-1"), Some(1))
    );
    // Add email's subscription: new events reach it.
    let out = m.mesh.apply(&subscription(
        "email-orders",
        "order.created",
        "email",
        FAST,
    ));
    assert!(out.status.success(), "{out:?}");
    let admin = m.publisher.addr("admin");
    wait_until("the new subscription", Duration::from_secs(10), || async {
        config(&m.client, admin).await["subscriptions"]["email-orders"].is_object()
    })
    .await;
    assert_eq!(one("p-2").await.status, 202);
    m.wait_received("email", 1, Duration::from_secs(10)).await;
    m.wait_received("billing", 2, Duration::from_secs(10)).await;
    let (ids, _) = m.distinct("email").await;
    assert_eq!(
        ids,
        HashSet::from(["p-2".to_string()]),
        "p-1 was published before"
    );
    // Delete it again: email gets nothing new.
    let out = m.mesh.sinewctl(&["delete", "subscription", "email-orders"]);
    assert!(out.status.success(), "{out:?}");
    wait_until("the deletion", Duration::from_secs(10), || async {
        config(&m.client, admin).await["subscriptions"]["email-orders"].is_null()
    })
    .await;
    let answer = one("p-3").await;
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(json["subscribers"].as_u64(), Some(1));
    m.wait_received("billing", 3, Duration::from_secs(10)).await;
    assert_eq!(m.distinct("email").await.0.len(), 1);
    // An invalid subscription is refused with its field path.
    let out = m
        .mesh
        .apply("kind: Subscription\nname: bad\nspec: {topic: 'a b', service: email}\n");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.topic"),
        "{out:?}"
    );

    // Bad input.
    let big = vec![b'x'; 1024 * 1024 + 1];
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Bytes, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "/v1/events/bad%20topic",
            vec![],
            Bytes::from_static(b"x"),
            400,
            "bad-request",
        ),
        (
            "/v1/events/a..b",
            vec![],
            Bytes::from_static(b"x"),
            400,
            "bad-request",
        ),
        (
            "/v1/events/order.created",
            vec![],
            Bytes::from(big),
            413,
            "too-large",
        ),
        (
            "/v1/events/order.created",
            vec![("content-type", "application/cloudevents+xml")],
            Bytes::from_static(b"<e/>"),
            415,
            "unsupported-media-type",
        ),
        (
            "/v1/events/order.created",
            vec![("content-type", "application/cloudevents+json")],
            Bytes::from_static(b"{not json"),
            400,
            "bad-request",
        ),
        (
            "/v1/events/order.created:batch",
            vec![("content-type", "application/json")],
            Bytes::from_static(b"{\"not\": \"an array\"}"),
            400,
            "bad-request",
        ),
        (
            "/v1/events/order.created:batch",
            vec![("content-type", "application/json")],
            Bytes::from_static(b"[{\"id\": \"ok-1\"}, {\"specversion\": \"0.3\"}]"),
            400,
            "bad-request",
        ),
        (
            "/v1/events/order.created",
            vec![("ce-specversion", "0.3")],
            Bytes::from_static(b"x"),
            400,
            "bad-request",
        ),
    ];
    for (path, headers, body, status, reason) in cases {
        let answer = post(&m.client, outbound, path, &headers, body).await;
        assert_eq!(
            answer.status,
            status,
            "{path} {headers:?}: {}",
            answer.text()
        );
        assert_eq!(answer.header("sinew-error"), Some(reason), "{path}");
    }
    let answer = get(&m.client, outbound, "127.0.0.1", "/v1/events/order.created")
        .await
        .unwrap();
    assert_eq!(answer.status, 405);
    // Nothing of it was stored or delivered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.wait_pending("no pending events", |p| p == 0.0).await;
    let (ids, _) = m.distinct("billing").await;
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(!ids.contains("ok-1"));
}

on_both_backends!(a_full_outbox_refuses_then_recovers);
/// Test 8: past the outbox's bound, 503 `outbox-full`; once subscribers drain it,
/// publishing works again.
async fn a_full_outbox_refuses_then_recovers(backend: Backend) {
    let policy = subscription("billing-orders", "order.created", "billing", FAST);
    let m = EventMesh::start(
        backend,
        "events-full",
        &[("billing", 1)],
        &policy,
        &["--outbox-max-events", "50"],
    )
    .await;
    m.answer_with("billing", 503).await;
    let outbound = m.publisher.addr("outbound");
    publish_batches(&m.client, outbound, "order.created", "f", 50).await;
    let answer = post(&m.client, outbound, "/v1/events/order.created", &[], "x").await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert_eq!(answer.header("sinew-error"), Some("outbox-full"));
    m.answer_with("billing", 200).await;
    m.wait_received("billing", 50, Duration::from_secs(30))
        .await;
    m.wait_pending("the outbox to drain", |p| p == 0.0).await;
    let answer = post(&m.client, outbound, "/v1/events/order.created", &[], "x").await;
    assert_eq!(answer.status, 202, "{}", answer.text());
}

on_both_backends!(a_subscribers_allow_list_holds_for_events);
/// A subscriber's `allow` list admits publishers as it admits callers: through the embedded
/// outbox the subscriber's sidecar checks the publisher's certificate; through NATS it checks
/// the publisher its sidecar recorded in the event (issue 11, item 9). A refused event is a
/// dead letter, never delivered.
async fn a_subscribers_allow_list_holds_for_events(backend: Backend) {
    let only_web = "kind: Service\nname: billing\nspec: {allow: [web]}\n---\n";
    let policy = subscription("billing-orders", "order.created", "billing", FAST) + only_web;
    let m = EventMesh::start(backend, "events-allow", &[("billing", 1)], &policy, &[]).await;
    let outbound = m.publisher.addr("outbound");
    let answer = post(
        &m.client,
        outbound,
        "/v1/events/order.created",
        &[("ce-id", "from-orders-1"), ("ce-source", "/svc/web")],
        "x",
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    let admin = m.publisher.addr("admin");
    wait_until(
        "the refused event's dead letter",
        Duration::from_secs(20),
        || async {
            let answer = get(&m.client, admin, "localhost", "/events").await.unwrap();
            let v: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
            v["dead_letters"].as_u64() == Some(1)
        },
    )
    .await;
    let out = m.mesh.sinewctl(&["events", "dead-letters"]);
    let table = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(table.contains("from-orders-1"), "{table}");
    assert!(
        table.contains("forbidden") || table.contains("403"),
        "{table}"
    );
    // A `ce-source` naming another service changes nothing: the publisher is the sidecar's.
    assert_eq!(m.distinct("billing").await.0.len(), 0);

    // Once billing allows orders, its events are delivered.
    let allowed = "kind: Service\nname: billing\nspec: {allow: [web, orders]}\n";
    let version = applied_version(&m.mesh.apply(allowed));
    wait_until(
        "billing's sidecar to allow orders",
        Duration::from_secs(10),
        || async {
            let (_, sidecar) = &m.subscribers["billing"][0];
            config(&m.client, sidecar.addr("admin")).await["version"]
                .as_u64()
                .unwrap_or(0)
                >= version
        },
    )
    .await;
    let answer = post(
        &m.client,
        outbound,
        "/v1/events/order.created",
        &[("ce-id", "from-orders-2")],
        "x",
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    m.wait_received("billing", 1, Duration::from_secs(20)).await;
    let (ids, _) = m.distinct("billing").await;
    assert!(
        ids.contains("from-orders-2") && !ids.contains("from-orders-1"),
        "{ids:?}"
    );
}

/// A NATS server that requires a token: a sidecar given it (`--nats-token-file`) publishes
/// and delivers; one without it cannot publish (503), and says why in its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_a_token() {
    let mesh = Mesh::start("nats-token");
    let nats = Nats::start_own(
        "tok".into(),
        mesh.dir(),
        "max_payload: 8MB\nauthorization { token: \"s3cret-token\" }\n",
    );
    let token_file = mesh.dir().join("nats-token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    let out = mesh.apply(&subscription(
        "billing-orders",
        "order.created",
        "billing",
        FAST,
    ));
    assert!(out.status.success(), "{out:?}");
    let client = http_client();
    let mut flags = nats.sidecar_flags();
    flags.extend([
        "--nats-token-file".to_string(),
        token_file.display().to_string(),
    ]);
    let billing_app = mesh.app("billing-1");
    let billing = mesh.sidecar(
        "billing-1",
        "billing",
        billing_app.addr("http"),
        &strs(&flags),
    );
    let orders_app = mesh.app("orders-1");
    let orders = mesh.sidecar("orders-1", "orders", orders_app.addr("http"), &strs(&flags));
    let stranger_app = mesh.app("orders-2");
    let stranger = mesh.sidecar(
        "orders-2",
        "orders",
        stranger_app.addr("http"),
        &strs(&nats.sidecar_flags()),
    );
    for sidecar in [&billing, &orders, &stranger] {
        wait_ready(&client, sidecar).await;
    }
    let answer = post(
        &client,
        orders.addr("outbound"),
        "/v1/events/order.created",
        &[("ce-id", "with-token")],
        "x",
    )
    .await;
    assert_eq!(answer.status, 202, "{}", answer.text());
    wait_until(
        "billing to receive the event",
        Duration::from_secs(20),
        || async {
            let answer = get(
                &client,
                billing_app.addr("http"),
                "app",
                "/control/received",
            )
            .await
            .unwrap();
            answer.text().contains("with-token")
        },
    )
    .await;
    let answer = post(
        &client,
        stranger.addr("outbound"),
        "/v1/events/order.created",
        &[("ce-id", "no-token")],
        "x",
    )
    .await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    let log = stranger.log_text().to_lowercase();
    assert!(log.contains("authorization"), "the log names the refusal");
}
