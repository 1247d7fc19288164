//! The chaos suite: steady load through `web`'s sidecar to three instances of `orders`
//! while instances die, and the mesh heals around them.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_costs_no_requests_and_leaves_after_its_lease() {
    // A lease grace longer than the run: taking the dead instance out is the caller's job.
    let mut p = pair_with("chaos-kill", 3, "10s").await;
    p.apply("kind: Service\nname: orders\nspec:\n  timeout: 2s\n  retries: {attempts: 3, per_try_timeout: 250ms}\n").await;
    let web_admin = p.web.addr("admin");

    // 200 rps for 8 s; orders-3's sidecar dies (SIGKILL) 3 s in.
    let mut victim = Some(p.orders.remove(2));
    let report = steady_load(
        p.web.addr("outbound"),
        "orders",
        "/whoami",
        200,
        Duration::from_secs(8),
        |elapsed| {
            if elapsed >= Duration::from_secs(3)
                && let Some((_app, mut sidecar)) = victim.take()
            {
                sidecar.kill();
            }
        },
    )
    .await;
    let retries = metric(&p.client, web_admin, "sinew_retries_total").await;
    let ejections = metric(&p.client, web_admin, "sinew_outlier_ejections_total").await;
    eprintln!(
        "sent {}, ok {}, failures {:?}, retries {retries}, ejections {ejections}",
        report.sent, report.ok, report.failures
    );
    assert!(victim.is_none(), "the instance was killed during the run");
    assert!(
        report.success_ratio() >= 0.999,
        "success ratio {}: {:?}",
        report.success_ratio(),
        report.failures
    );
    assert!(
        retries >= 1.0,
        "requests caught on the dead instance were retried"
    );
    // Whether it was ejected depends on how often the balancer still picked it: a dead
    // instance's timed-out tries raise its latency estimate, so it is mostly avoided first.
    // After the lease grace it is gone from web's configuration.
    wait_endpoints(&p.client, &p.web, "orders", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_failing_instance_is_ejected_and_comes_back_when_healed() {
    let p = pair_with("chaos-503", 3, "10s").await;
    p.apply("kind: Service\nname: orders\nspec:\n  timeout: 2s\n  retries: {attempts: 3, on: [503]}\n  outlier: {failure_percent: 30, min_requests: 10, base_ejection: 2s, max_ejection: 4s}\n").await;
    let web_admin = p.web.addr("admin");
    let flaky = p.orders[2].0.addr("http");
    let served = || async {
        get(&p.client, flaky, "x", "/control/served")
            .await
            .unwrap()
            .text()
            .parse::<u64>()
            .unwrap()
    };
    assert_eq!(
        get(&p.client, flaky, "x", "/control/fail?percent=50")
            .await
            .unwrap()
            .status,
        200
    );

    let report = steady_load(
        p.web.addr("outbound"),
        "orders",
        "/whoami",
        200,
        Duration::from_secs(6),
        |_| {},
    )
    .await;
    let ejections = metric(&p.client, web_admin, "sinew_outlier_ejections_total").await;
    let retries = metric(&p.client, web_admin, "sinew_retries_total").await;
    eprintln!(
        "sent {}, ok {}, failures {:?}, retries {retries}, ejections {ejections}",
        report.sent, report.ok, report.failures
    );
    assert!(
        report.success_ratio() >= 0.999,
        "success ratio {}: {:?}",
        report.success_ratio(),
        report.failures
    );
    assert!(ejections >= 1.0, "the failing instance was ejected");
    assert!(retries >= 1.0, "its 503s were retried elsewhere");

    // Healed: once its ejection (at most 4 s) has run out, a probe finds it well and it
    // takes traffic again.
    assert_eq!(
        get(&p.client, flaky, "x", "/control/fail?percent=0")
            .await
            .unwrap()
            .status,
        200
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = served().await;
    let report = steady_load(
        p.web.addr("outbound"),
        "orders",
        "/whoami",
        100,
        Duration::from_secs(4),
        |_| {},
    )
    .await;
    let after = served().await;
    eprintln!(
        "after healing: ok {} of {}, the healed instance served {}",
        report.ok,
        report.sent,
        after - before
    );
    assert_eq!(report.ok, report.sent);
    assert!(after > before, "the healed instance receives traffic again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_concurrent_requests_fail_fast_as_overloaded() {
    let p = pair("chaos-overload", 2).await;
    p.apply("kind: Service\nname: orders\nspec: {max_concurrent: 4}\n")
        .await;
    let web_admin = p.web.addr("admin");
    let outbound = p.web.addr("outbound");
    let burst: Vec<_> = (0..40)
        .map(|_| {
            let client = p.client.clone();
            tokio::spawn(async move {
                get(&client, outbound, "orders", "/slow?ms=1500")
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut ok = 0;
    let mut overloaded = 0;
    for answer in burst {
        let answer = answer.await.unwrap();
        match (answer.status, answer.header("sinew-error")) {
            (200, _) => ok += 1,
            (503, Some("overloaded")) => overloaded += 1,
            other => panic!("unexpected answer {other:?}: {}", answer.text()),
        }
    }
    assert_eq!(
        (ok, overloaded),
        (4, 36),
        "4 admitted, the rest refused at once"
    );
    assert_eq!(
        metric(&p.client, web_admin, "sinew_overloaded_total").await,
        36.0
    );
    // The permits came back with the responses.
    let answer = get(&p.client, outbound, "orders", "/whoami").await.unwrap();
    assert_eq!(answer.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_are_replayed_on_retry_large_ones_stream_once() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let p = pair("chaos-replay", 2).await;
    p.apply("kind: Service\nname: orders\nspec:\n  retries: {attempts: 3, on: [503]}\n")
        .await;
    let web_admin = p.web.addr("admin");
    let broken = p.orders[0].0.addr("http");
    assert_eq!(
        get(&p.client, broken, "x", "/control/fail?percent=100")
            .await
            .unwrap()
            .status,
        200
    );
    let outbound = p.web.addr("outbound");
    let post = |body: Bytes| {
        let client = p.client.clone();
        async move {
            let request = http::Request::post(format!("http://{outbound}/echo"))
                .header("host", "orders")
                .body(Full::new(body))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    };
    // 10 KiB: kept, so a 503 from the broken instance is retried on the other.
    let small = Bytes::from((0..10_240u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    for _ in 0..20 {
        let (status, echoed) = post(small.clone()).await;
        assert_eq!(status, 200);
        assert!(echoed == small, "the replayed body arrived whole");
    }
    assert!(metric(&p.client, web_admin, "sinew_retries_total").await >= 1.0);
    // 100 KiB: beyond the replay buffer, sent once; a 503 comes back as it is.
    let large = Bytes::from(vec![7u8; 100 * 1024]);
    for _ in 0..5 {
        let (status, echoed) = post(large.clone()).await;
        assert!(
            status == 200 && echoed == large || status == 503,
            "status {status}"
        );
    }
    assert_eq!(
        metric(&p.client, web_admin, "sinew_retries_unreplayable_total").await,
        5.0
    );
}
