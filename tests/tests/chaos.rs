//! The chaos suite: steady load through `web`'s sidecar to three instances of `orders`
//! while instances die, and the mesh heals around them.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use std::time::Duration;

/// The cases that assert on latency (p99, fast errors) run their load one at a time: the
/// machine has two cores, and two load runs at once would measure each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
        "{}; retries {retries}, ejections {ejections}",
        report.summary()
    );
    figures("1 an instance is killed", &report, retries, ejections, "");
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
        "{}; retries {retries}, ejections {ejections}",
        report.summary()
    );
    figures(
        "2 an instance fails half its requests",
        &report,
        retries,
        ejections,
        "",
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

/// Two instances of `orders`, the first answering 503 to everything; `retries.on: [503]`, so
/// a request that reaches it is retried on the other when its body was kept.
async fn pair_with_a_broken_instance(test: &str) -> Pair {
    let p = pair(test, 2).await;
    p.apply("kind: Service\nname: orders\nspec:\n  retries: {attempts: 3, on: [503]}\n")
        .await;
    let broken = p.orders[0].0.addr("http");
    let answer = get(&p.client, broken, "x", "/control/fail?percent=100")
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_are_replayed_on_retry_large_ones_stream_once() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let p = pair_with_a_broken_instance("chaos-replay").await;
    let web_admin = p.web.addr("admin");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_without_a_length_are_replayed_within_the_buffer_and_stream_once_past_it() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    let p = pair_with_a_broken_instance("chaos-replay-chunked").await;
    let web_admin = p.web.addr("admin");
    let outbound = p.web.addr("outbound");
    // A client that sends bodies as a stream of chunks, with no content-length
    // (HTTP/1.1 chunked transfer encoding).
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>>(
    );
    let post = |body: Bytes| {
        let client = client.clone();
        async move {
            let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = body
                .chunks(4096)
                .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let stream = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
            let request = http::Request::post(format!("http://{outbound}/echo"))
                .header("host", "orders")
                .body(stream)
                .unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status().as_u16();
            let chunked = response
                .headers()
                .get("echo-transfer-encoding")
                .is_some_and(|v| v == "chunked");
            (
                status,
                chunked,
                response.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    };
    let small = Bytes::from((0..10_240u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    for _ in 0..20 {
        let (status, _, echoed) = post(small.clone()).await;
        assert_eq!(status, 200, "a chunked body within 64 KiB is replayed");
        assert!(echoed == small, "the replayed body arrived whole");
    }
    let retries = metric(&p.client, web_admin, "sinew_retries_total").await;
    assert!(retries >= 1.0, "the broken instance's 503s were retried");
    assert_eq!(
        metric(&p.client, web_admin, "sinew_retries_unreplayable_total").await,
        0.0
    );
    // 100 KiB in chunks: past the buffer, it streams on once; 503s come back as they are.
    let large = Bytes::from(vec![7u8; 100 * 1024]);
    let mut answered = 0;
    for _ in 0..6 {
        let (status, _, echoed) = post(large.clone()).await;
        assert!(
            status == 200 && echoed == large || status == 503,
            "status {status}"
        );
        answered += 1;
    }
    let unreplayable = metric(&p.client, web_admin, "sinew_retries_unreplayable_total").await;
    eprintln!(
        "chunked replay: {retries} retries; {unreplayable} of {answered} large bodies unreplayable"
    );
    assert_eq!(unreplayable, 6.0, "each large body passed the buffer once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_endpoints_fails_fast_and_a_waiting_request_gets_a_new_instance() {
    let p = pair("chaos-no-endpoints", 1).await;
    // `billing` has a policy but no instance yet.
    p.apply("kind: Service\nname: billing\nspec: {endpoint_wait: 300ms}\n")
        .await;
    let outbound = p.web.addr("outbound");
    let web_admin = p.web.addr("admin");
    let started = std::time::Instant::now();
    let answer = get(&p.client, outbound, "billing", "/whoami")
        .await
        .unwrap();
    let waited = started.elapsed();
    eprintln!("no endpoints: answered {} after {waited:?}", answer.status);
    assert_eq!(
        (answer.status, answer.header("sinew-error")),
        (503, Some("no-endpoints"))
    );
    assert!(
        waited >= Duration::from_millis(250),
        "it waited for an endpoint first ({waited:?})"
    );
    assert!(
        waited < Duration::from_secs(5),
        "bounded by endpoint_wait, not the 15 s timeout ({waited:?})"
    );
    assert_eq!(
        metric(&p.client, web_admin, "sinew_no_endpoints_total").await,
        1.0
    );

    // At most `max_pending` requests wait; the others are refused at once as overloaded.
    p.apply("kind: Service\nname: billing\nspec: {endpoint_wait: 1s, max_pending: 2}\n")
        .await;
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let client = p.client.clone();
        tasks.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let answer = get(&client, outbound, "billing", "/whoami").await.unwrap();
            let reason = answer.header("sinew-error").unwrap_or_default().to_string();
            (answer.status, reason, started.elapsed())
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    eprintln!("max_pending 2, 5 requests: {answers:?}");
    let overloaded: Vec<_> = answers.iter().filter(|a| a.1 == "overloaded").collect();
    let waited: Vec<_> = answers.iter().filter(|a| a.1 == "no-endpoints").collect();
    assert_eq!((overloaded.len(), waited.len()), (3, 2), "{answers:?}");
    assert!(
        overloaded
            .iter()
            .all(|a| a.0 == 503 && a.2 < Duration::from_millis(800))
    );
    assert!(waited.iter().all(|a| a.2 >= Duration::from_millis(800)));

    // With a longer wait, a request sent before the first instance exists is answered by it.
    p.apply("kind: Service\nname: billing\nspec: {endpoint_wait: 20s}\n")
        .await;
    let client = p.client.clone();
    let waiting = tokio::spawn(async move { get(&client, outbound, "billing", "/whoami").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let app = p.mesh.app("billing-1");
    let _sidecar = p
        .mesh
        .sidecar("billing-1", "billing", app.addr("http"), &[]);
    let answer = waiting.await.unwrap().unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "billing-1");
    assert!(metric(&p.client, web_admin, "sinew_endpoint_waits_total").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_of_posts_are_retried_only_when_the_policy_says_so() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let p = pair("chaos-post-timeout", 2).await;
    let outbound = p.web.addr("outbound");
    let post = || {
        let client = p.client.clone();
        async move {
            let request = http::Request::post(format!("http://{outbound}/whoami"))
                .header("host", "orders")
                .body(Full::new(Bytes::from_static(b"order")))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let status = response.status().as_u16();
            let reason = response
                .headers()
                .get("sinew-error")
                .map(|v| v.to_str().unwrap().to_string());
            let _ = response.into_body().collect().await;
            (status, reason)
        }
    };
    // Each instance stalls its next request (the first of every hundred) for 2 s: a first
    // try times out whichever instance it reaches, and so does a retry on the other one.
    let stall_next = || async {
        for (app, _) in &p.orders {
            get(
                &p.client,
                app.addr("http"),
                "x",
                "/control/stall?ms=2000&percent=1",
            )
            .await
            .unwrap();
        }
    };
    let web_admin = p.web.addr("admin");
    let base = "kind: Service\nname: orders\nspec:\n  timeout: 5s\n";
    p.apply(&format!(
        "{base}  retries: {{attempts: 3, per_try_timeout: 200ms}}\n"
    ))
    .await;
    stall_next().await;
    assert_eq!(
        post().await,
        (504, Some("timeout".to_string())),
        "a POST that timed out is not retried by default"
    );
    assert_eq!(
        metric(&p.client, web_admin, "sinew_retries_total").await,
        0.0
    );
    p.apply(&format!(
        "{base}  retries: {{attempts: 3, per_try_timeout: 200ms, on: [timeout]}}\n"
    ))
    .await;
    stall_next().await;
    assert_eq!(
        post().await,
        (200, None),
        "with `on: [timeout]`: both instances time out once, the third try answers"
    );
    let retries = metric(&p.client, web_admin, "sinew_retries_total").await;
    eprintln!(
        "POST timeouts: not retried by default; retried {retries} times with `on: [timeout]`"
    );
    assert_eq!(retries, 2.0);
}

/// Sets a testapp control knob and checks it answered.
async fn control(p: &Pair, instance: usize, path: &str) {
    let answer = get(&p.client, p.orders[instance].0.addr("http"), "x", path)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{path}: {}", answer.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_instance_loses_its_traffic_so_the_p99_does_not_pay_its_latency() {
    let _serial = SERIAL.lock().await;
    let p = pair("chaos-slow", 3).await;
    let web_admin = p.web.addr("admin");
    let outbound = p.web.addr("outbound");
    let slow_app = p.orders[2].0.addr("http");
    let served = || async {
        get(&p.client, slow_app, "x", "/control/served")
            .await
            .unwrap()
            .text()
            .parse::<u64>()
            .unwrap()
    };
    // Warm up, so every instance has a measured latency before one turns slow.
    steady_load(
        outbound,
        "orders",
        "/whoami",
        200,
        Duration::from_secs(1),
        |_| {},
    )
    .await;
    control(&p, 2, "/control/latency?ms=200").await;
    let before = served().await;
    let report = steady_load(
        outbound,
        "orders",
        "/whoami",
        300,
        Duration::from_secs(10),
        |_| {},
    )
    .await;
    let slow_served = served().await - before;
    let retries = metric(&p.client, web_admin, "sinew_retries_total").await;
    let ejections = metric(&p.client, web_admin, "sinew_outlier_ejections_total").await;
    let share = slow_served as f64 / report.sent as f64;
    eprintln!(
        "{}; the slow instance served {slow_served} ({:.2}%)",
        report.summary(),
        share * 100.0
    );
    figures(
        "3 one instance +200 ms",
        &report,
        retries,
        ejections,
        &format!(
            "the slow instance served {slow_served} ({:.2}%)",
            share * 100.0
        ),
    );
    assert_eq!(report.ok, report.sent, "{:?}", report.failures);
    // The behaviour that keeps the p99 under 100 ms: the balancer moves load away from the
    // slow instance, which would get a third of the requests if picked at random. Asserted
    // on the count the instance itself saw. On a quiet machine it gets under 1% and the p99
    // stays under 100 ms (README); when other processes starve the 2 cores, the fast
    // instances' own latency peaks make the slow one look less bad now and then, and it gets
    // a little more, so the bound here leaves room for that. The client-measured p99 is
    // reported, not asserted: it carries the machine's other load.
    assert!(
        share < 0.05,
        "the slow instance served {slow_served} of {}",
        report.sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_instance_fails_retries_stay_within_the_budget_and_callers_hear_at_once() {
    let _serial = SERIAL.lock().await;
    let p = pair("chaos-all-fail", 3).await;
    p.apply("kind: Service\nname: orders\nspec:\n  timeout: 2s\n  retries: {attempts: 3, on: [503], budget: {ratio: 0.2, min_per_second: 10}}\n").await;
    let web_admin = p.web.addr("admin");
    for i in 0..3 {
        control(&p, i, "/control/fail?percent=100").await;
    }
    let (rps, seconds) = (200u32, 10u64);
    let report = steady_load(
        p.web.addr("outbound"),
        "orders",
        "/whoami",
        rps,
        Duration::from_secs(seconds),
        |_| {},
    )
    .await;
    let retries = metric(&p.client, web_admin, "sinew_retries_total").await;
    let refused = metric(&p.client, web_admin, "sinew_retries_budget_exhausted_total").await;
    let ejections = metric(&p.client, web_admin, "sinew_outlier_ejections_total").await;
    let bound = 0.2 * report.sent as f64 + 10.0 * seconds as f64;
    eprintln!(
        "{}; retries {retries} (bound {bound} + slack), refused by the budget {refused}",
        report.summary()
    );
    figures(
        "4 every instance fails",
        &report,
        retries,
        ejections,
        &format!("budget bound {bound}, refused {refused}"),
    );
    // Slack: the budget's 10 s window may let through up to one extra second's floor.
    assert!(
        retries <= bound + 10.0 + 5.0,
        "retries {retries} over the budget {bound}"
    );
    assert!(refused > 0.0, "the budget refused retries");
    // Fast, clear errors: every caller got the app's 503 (not a mesh timeout), and none
    // waited anywhere near the 2 s timeout.
    assert_eq!(report.ok, 0);
    assert!(
        report
            .failures
            .iter()
            .all(|(status, reason)| *status == 503 && reason.is_empty()),
        "{:?}",
        report
            .failures
            .iter()
            .find(|f| f.0 != 503 || !f.1.is_empty())
    );
    assert!(
        report.percentile(1.0) < Duration::from_secs(1),
        "max {:?}",
        report.percentile(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_load_past_max_concurrent_is_refused_at_once_and_memory_stays_bounded() {
    let _serial = SERIAL.lock().await;
    let p = pair("chaos-overload-load", 3).await;
    p.apply("kind: Service\nname: orders\nspec: {max_concurrent: 20}\n")
        .await;
    let web_admin = p.web.addr("admin");
    for i in 0..3 {
        control(&p, i, "/control/latency?ms=200").await;
    }
    let pid = p.web.pid;
    let rss_before = proc_status_kib(pid, "VmRSS:");
    // 20 in flight × 200 ms = 100 rps of capacity; 400 rps are offered for 8 s.
    let report = steady_load(
        p.web.addr("outbound"),
        "orders",
        "/whoami",
        400,
        Duration::from_secs(8),
        |_| {},
    )
    .await;
    let rss_after = proc_status_kib(pid, "VmRSS:");
    let hwm = proc_status_kib(pid, "VmHWM:");
    let overloaded = metric(&p.client, web_admin, "sinew_overloaded_total").await;
    let retries = metric(&p.client, web_admin, "sinew_retries_total").await;
    let ejections = metric(&p.client, web_admin, "sinew_outlier_ejections_total").await;
    let refused: Vec<_> = report
        .failures
        .iter()
        .filter(|(s, r)| *s == 503 && r == "overloaded")
        .collect();
    let refusal_p50 = report.percentile_of(0.5, |s| s == 503);
    let refusal_p99 = report.percentile_of(0.99, |s| s == 503);
    eprintln!(
        "{}; overloaded {overloaded}, refused in p50 {refusal_p50:?} / p99 {refusal_p99:?}; web sidecar RSS {rss_before} -> {rss_after} KiB, peak {hwm} KiB",
        report.summary()
    );
    figures(
        "5 load past max_concurrent",
        &report,
        retries,
        ejections,
        &format!(
            "{} refused overloaded in p50 {:.1} ms / p99 {:.1} ms; RSS {rss_before}->{rss_after} KiB, peak {hwm} KiB",
            refused.len(),
            refusal_p50.as_secs_f64() * 1e3,
            refusal_p99.as_secs_f64() * 1e3
        ),
    );
    assert_eq!(
        refused.len(),
        report.failures.len(),
        "every failure is an overload refusal"
    );
    assert_eq!(refused.len() as f64, overloaded);
    // Admitted about 100 rps: at most 20 in flight (nothing queued past the limit).
    assert!(
        report.ok > 0 && report.ok <= 20 * 8 * 1000 / 200 + 20,
        "ok {}",
        report.ok
    );
    assert!(
        refused.len() > report.sent / 2,
        "most of the excess was refused"
    );
    // Refused at once: an overload answer waits for nothing (slack for a loaded machine).
    assert!(
        refusal_p99 < Duration::from_millis(100),
        "refusals p99 {refusal_p99:?}"
    );
    // Nothing queued without bound: the slowest answer is one app latency plus scheduling,
    // not seconds of queueing (the run offers 4× the capacity for 8 s).
    assert!(
        report.percentile(1.0) < Duration::from_secs(2),
        "max {:?}",
        report.percentile(1.0)
    );
    assert!(
        rss_after < rss_before + 64 * 1024 && hwm < 256 * 1024,
        "RSS {rss_before} -> {rss_after} KiB, peak {hwm} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_failing_its_health_checks_is_withdrawn_and_returns_when_healthy() {
    let interval = Duration::from_millis(500);
    let p = pair_opts(
        "chaos-health",
        3,
        "1s",
        &[
            "--health-http",
            "/health",
            "--health-interval",
            "500ms",
            "--unhealthy-threshold",
            "2",
        ],
    )
    .await;
    let web_admin = p.web.addr("admin");
    let sick = p.orders[2].1.addr("inbound").to_string();
    let listed = || async {
        let answer = get(&p.client, web_admin, "localhost", "/endpoints")
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        json["orders"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect::<Vec<_>>()
    };
    assert!(listed().await.contains(&sick));
    let checks = get(
        &p.client,
        p.orders[2].0.addr("http"),
        "x",
        "/control/health-checks",
    )
    .await
    .unwrap()
    .text();
    assert!(
        checks.parse::<u64>().unwrap() >= 1,
        "the sidecar checks its app"
    );

    // Load across the transition: requests that reach the instance after its app turned
    // unhealthy, before the withdrawal reaches web, are refused by its sidecar (`unhealthy`)
    // and retried elsewhere, so no caller sees the transition.
    let outbound = p.web.addr("outbound");
    let transition = tokio::spawn(async move {
        steady_load(
            outbound,
            "orders",
            "/whoami",
            200,
            Duration::from_secs(3),
            |_| {},
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    control(&p, 2, "/control/health?ok=0").await;
    let failed_at = std::time::Instant::now();
    wait_until(
        "the unhealthy instance to leave web's endpoints",
        Duration::from_secs(10),
        || async { !listed().await.contains(&sick) },
    )
    .await;
    let withdrawn_after = failed_at.elapsed();
    let transition = transition.await.unwrap();
    let refused_unhealthy = metric(
        &p.client,
        p.orders[2].1.addr("admin"),
        "sinew_inbound_unhealthy_total",
    )
    .await;
    eprintln!(
        "across the withdrawal: {}; refused as unhealthy by its sidecar {refused_unhealthy}",
        transition.summary()
    );
    assert_eq!(
        transition.ok, transition.sent,
        "the withdrawal cost no request: {:?}",
        transition.failures
    );
    // While withdrawn, traffic goes only to the two others.
    let served = || async {
        get(
            &p.client,
            p.orders[2].0.addr("http"),
            "x",
            "/control/served",
        )
        .await
        .unwrap()
        .text()
        .parse::<u64>()
        .unwrap()
    };
    let before = served().await;
    let report = steady_load(
        p.web.addr("outbound"),
        "orders",
        "/whoami",
        200,
        Duration::from_secs(3),
        |_| {},
    )
    .await;
    let during = served().await - before;

    control(&p, 2, "/control/health?ok=1").await;
    let healed_at = std::time::Instant::now();
    wait_until(
        "the healed instance to return",
        Duration::from_secs(10),
        || async { listed().await.contains(&sick) },
    )
    .await;
    let returned_after = healed_at.elapsed();
    let sidecar_metrics = p.orders[2].1.addr("admin");
    let transitions = metric(&p.client, sidecar_metrics, "sinew_health_transitions_total").await;
    eprintln!(
        "{}; withdrawn after {withdrawn_after:?}, returned after {returned_after:?} (interval {interval:?}); the sick instance served {during} while withdrawn; transitions {transitions}",
        report.summary()
    );
    figures(
        "6 app health check fails",
        &transition,
        metric(&p.client, web_admin, "sinew_retries_total").await,
        metric(&p.client, web_admin, "sinew_outlier_ejections_total").await,
        &format!(
            "withdrawn after {withdrawn_after:.2?}, returned after {returned_after:.2?}; {refused_unhealthy} refused as unhealthy and retried"
        ),
    );
    assert_eq!(report.ok, report.sent, "{:?}", report.failures);
    assert_eq!(during, 0, "a withdrawn instance gets no traffic");
    assert_eq!(transitions, 2.0, "unhealthy, then healthy");
    // Two failed checks (at most two intervals) plus the push; slack for a loaded machine.
    let bound = interval * 2 + Duration::from_millis(750);
    assert!(
        withdrawn_after < bound,
        "withdrawn after {withdrawn_after:?}"
    );
    assert!(returned_after < bound, "returned after {returned_after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_hides_an_instance_that_stalls_now_and_then() {
    let _serial = SERIAL.lock().await;
    let p = pair("chaos-hedge", 3).await;
    p.apply(
        "kind: Service\nname: orders\nspec:\n  timeout: 3s\n  hedge: {delay: 40ms, max_extra: 1}\n",
    )
    .await;
    let web_admin = p.web.addr("admin");
    control(&p, 0, "/control/stall?ms=1000&percent=10").await;
    let report = steady_load(
        p.web.addr("outbound"),
        "orders",
        "/whoami",
        200,
        Duration::from_secs(10),
        |_| {},
    )
    .await;
    let hedges = metric(&p.client, web_admin, "sinew_hedges_total").await;
    let wins = metric(&p.client, web_admin, "sinew_hedge_wins_total").await;
    let retries = metric(&p.client, web_admin, "sinew_retries_total").await;
    let ejections = metric(&p.client, web_admin, "sinew_outlier_ejections_total").await;
    let cancelled = metric(
        &p.client,
        p.orders[0].1.addr("admin"),
        "sinew_inbound_cancelled_total",
    )
    .await;
    let stalled_count = |i: usize| {
        let client = p.client.clone();
        let app = p.orders[i].0.addr("http");
        async move {
            get(&client, app, "x", "/control/stalled")
                .await
                .unwrap()
                .text()
                .parse::<f64>()
                .unwrap()
        }
    };
    let stalled = stalled_count(0).await;
    eprintln!(
        "{}; hedges {hedges}, wins {wins}; the staller stalled {stalled}, cancelled {cancelled}",
        report.summary()
    );
    figures(
        "7 hedging, one instance stalls 1 s on 10%",
        &report,
        retries,
        ejections,
        &format!("hedges {hedges}, hedge wins {wins}, stalled {stalled}, cancelled {cancelled}"),
    );
    assert_eq!(report.ok, report.sent, "{:?}", report.failures);
    assert!(hedges >= 1.0 && wins >= 1.0, "stalled requests were hedged");
    // The behaviour that keeps the p99 under 100 ms: no caller waits out a stall. Every
    // request the instance stalled was hedged and lost the race, so its try was cancelled
    // (more may be: a normal answer that lost to its hedge), and no answer took as long as
    // a stall. Asserted on that rather than on the client-measured p99, which also carries
    // the machine's other load.
    assert!(stalled >= 1.0, "the instance stalled requests");
    // (At least 80%: on a starved machine a hedge can itself queue behind the stall.)
    assert!(
        cancelled >= (stalled * 0.8).floor(),
        "stalled requests were cancelled: {cancelled} of {stalled}"
    );
    let max = report.percentile(1.0);
    assert!(max < Duration::from_secs(1), "a caller waited {max:?}");

    // The same with the delay taken from the service's own p95, another instance stalling
    // (the first one lost its races, so the balancer now avoids it).
    p.apply("kind: Service\nname: orders\nspec:\n  timeout: 3s\n  hedge: {delay: p95}\n")
        .await;
    control(&p, 0, "/control/stall?ms=0&percent=0").await;
    control(&p, 1, "/control/stall?ms=1000&percent=10").await;
    let report = steady_load(
        p.web.addr("outbound"),
        "orders",
        "/whoami",
        200,
        Duration::from_secs(5),
        |_| {},
    )
    .await;
    let hedges_p95 = metric(&p.client, web_admin, "sinew_hedges_total").await - hedges;
    let wins_p95 = metric(&p.client, web_admin, "sinew_hedge_wins_total").await - wins;
    eprintln!(
        "with delay p95: {}; hedges {hedges_p95}, wins {wins_p95}",
        report.summary()
    );
    figures(
        "7b hedging with delay: p95",
        &report,
        metric(&p.client, web_admin, "sinew_retries_total").await - retries,
        metric(&p.client, web_admin, "sinew_outlier_ejections_total").await - ejections,
        &format!("hedges {hedges_p95}, hedge wins {wins_p95}"),
    );
    let stalled_p95 = stalled_count(1).await;
    let cancelled_p95 = metric(
        &p.client,
        p.orders[1].1.addr("admin"),
        "sinew_inbound_cancelled_total",
    )
    .await;
    eprintln!("with delay p95: the staller stalled {stalled_p95}, cancelled {cancelled_p95}");
    assert_eq!(report.ok, report.sent, "{:?}", report.failures);
    assert!(
        hedges_p95 >= 1.0 && stalled_p95 >= 1.0,
        "stalled requests were hedged"
    );
    assert!(
        cancelled_p95 >= stalled_p95,
        "every stalled request was cancelled"
    );
    let max = report.percentile(1.0);
    assert!(max < Duration::from_secs(1), "a caller waited {max:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_under_load_fails_no_request() {
    let p = pair("chaos-swap", 3).await;
    p.apply("kind: Service\nname: orders\nspec:\n  timeout: 5s\n  retries: {attempts: 2}\n")
        .await;
    let web_admin = p.web.addr("admin");
    let version_before = config(&p.client, web_admin).await["version"]
        .as_u64()
        .unwrap();
    let mesh_dir = p.mesh.dir().to_path_buf();
    let grpc = p.mesh.grpc.to_string();
    // Apply the tighter policy 3 s into an 8 s run, from another thread (sinewctl blocks).
    let mut applied = None;
    let report = steady_load(
        p.web.addr("outbound"),
        "orders",
        "/whoami",
        300,
        Duration::from_secs(8),
        |elapsed| {
            if elapsed >= Duration::from_secs(3) && applied.is_none() {
                let dir = mesh_dir.clone();
                let grpc = grpc.clone();
                applied = Some(std::thread::spawn(move || {
                    let file = dir.join("tighter.yaml");
                    std::fs::write(&file, "kind: Service\nname: orders\nspec:\n  timeout: 1s\n  max_concurrent: 512\n  retries: {attempts: 3, per_try_timeout: 300ms}\n").unwrap();
                    std::process::Command::new(bin("sinewctl"))
                        .arg("--control")
                        .arg(grpc)
                        .arg("--token-file")
                        .arg(dir.join("control/admin-token"))
                        .args(["apply", "-f"])
                        .arg(file)
                        .output()
                        .unwrap()
                }));
            }
        },
    )
    .await;
    let output = applied.expect("applied during the run").join().unwrap();
    assert!(output.status.success(), "{output:?}");
    let config = config(&p.client, web_admin).await;
    let version_after = config["version"].as_u64().unwrap();
    let retries = metric(&p.client, web_admin, "sinew_retries_total").await;
    let ejections = metric(&p.client, web_admin, "sinew_outlier_ejections_total").await;
    eprintln!(
        "{}; version {version_before} -> {version_after}",
        report.summary()
    );
    figures(
        "8 policy change under load",
        &report,
        retries,
        ejections,
        &format!("version {version_before} -> {version_after}"),
    );
    assert!(version_after > version_before, "the new policy was applied");
    assert_eq!(config["services"]["orders"]["policy"]["timeout"], "1s");
    assert_eq!(report.ok, report.sent, "{:?}", report.failures);
}
