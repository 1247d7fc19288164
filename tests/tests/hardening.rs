//! Defects found by trying the mesh as an attacker would (issue 11): an app forging a
//! sidecar's refusal, heads the framing cannot carry, and a peer holding the inbound with
//! stalled streams.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use std::process::Command;
use std::time::Duration;

fn curl(args: &[&str]) -> std::process::Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl is installed")
}

/// Status and headers of a `curl -i` answer (the last response block).
fn status_and_headers(output: &std::process::Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?} ({output:?})"));
    (status, head)
}

async fn served(p: &Pair) -> u64 {
    let mut total = 0;
    for (app, _) in &p.orders {
        let answer = get(&p.client, app.addr("http"), "orders", "/control/served")
            .await
            .unwrap();
        total += answer.text().trim().parse::<u64>().unwrap();
    }
    total
}

const RETRYING: &str = "kind: Service\nname: orders\nspec:\n  retries: {attempts: 3, on: [503]}\n";

/// An app answering 503 with `sinew-error: unhealthy` after doing the work must not make the
/// caller's sidecar send the request again: only the framing says "refused by the sidecar".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_cannot_forge_a_refusal_of_its_sidecar() {
    let p = pair("forged-refusal", 2).await;
    // Retries on, but for nothing an app answers: only a refusal before the app (or a
    // connect failure) may move this POST. The old defect took the app's header for one.
    p.apply("kind: Service\nname: orders\nspec:\n  retries: {attempts: 3}\n")
        .await;
    let outbound = p.web.addr("outbound").to_string();
    for _ in 0..10 {
        let output = curl(&[
            "-i",
            "-X",
            "POST",
            "-H",
            "Host: orders",
            "--data",
            "charge=1",
            &format!("http://{outbound}/forge"),
        ]);
        let (status, head) = status_and_headers(&output);
        assert_eq!(status, 503, "{head}");
        // The app's own `sinew-error` is dropped by its sidecar: the name is the mesh's.
        assert!(!head.contains("sinew-error"), "{head}");
    }
    assert_eq!(served(&p).await, 10, "each POST executed exactly once");
    let retries = metric(&p.client, p.web.addr("admin"), "sinew_retries_total").await;
    assert_eq!(retries, 0.0, "no retry of an app's answer");
    let dropped = metric(
        &p.client,
        p.orders[0].1.addr("admin"),
        "sinew_inbound_app_error_headers_dropped_total",
    )
    .await
        + metric(
            &p.client,
            p.orders[1].1.addr("admin"),
            "sinew_inbound_app_error_headers_dropped_total",
        )
        .await;
    assert_eq!(dropped, 10.0);
}

/// A head larger than the framing carries is the caller's error (431) or the answering app's
/// (502), never an endpoint failure: no ejection, no retry, and the instances keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_over_the_limit_are_refused_without_ejecting_anyone() {
    let p = pair("big-heads", 2).await;
    p.apply(RETRYING).await;
    let outbound = p.web.addr("outbound").to_string();
    let cookie = format!("Cookie: session={}", "x".repeat(70 * 1024));
    for _ in 0..6 {
        let output = curl(&[
            "-i",
            "-H",
            "Host: orders",
            "-H",
            &cookie,
            &format!("http://{outbound}/whoami"),
        ]);
        let (status, head) = status_and_headers(&output);
        assert_eq!(status, 431, "{head}");
        assert!(head.contains("sinew-error: header-too-large"), "{head}");
    }
    // The answer's head over the limit: the answering sidecar says so, 502, and the caller
    // neither retries it nor counts it against the instance.
    for _ in 0..6 {
        let output = curl(&[
            "-i",
            "-H",
            "Host: orders",
            &format!("http://{outbound}/big-header?kb=70"),
        ]);
        let (status, head) = status_and_headers(&output);
        assert_eq!(status, 502, "{head}");
        assert!(
            head.contains("sinew-error: response-header-too-large"),
            "{head}"
        );
    }
    let admin = p.web.addr("admin");
    assert_eq!(
        metric(&p.client, admin, "sinew_outlier_ejections_total").await,
        0.0
    );
    assert_eq!(metric(&p.client, admin, "sinew_retries_total").await, 0.0);
    assert_eq!(
        metric(&p.client, admin, "sinew_request_head_too_large_total").await,
        6.0
    );
    // A head just under the limit crosses, and both instances still serve.
    let cookie = format!("Cookie: session={}", "x".repeat(60 * 1024));
    let output = curl(&[
        "-i",
        "-H",
        "Host: orders",
        "-H",
        &cookie,
        &format!("http://{outbound}/whoami"),
    ]);
    assert_eq!(status_and_headers(&output).0, 200);
    assert_eq!(endpoints(&p.client, admin, "orders").await.len(), 2);
    for _ in 0..20 {
        let answer = get(&p.client, p.web.addr("outbound"), "orders", "/whoami")
            .await
            .unwrap();
        assert_eq!(answer.status, 200);
    }
    assert_eq!(
        metric(&p.client, admin, "sinew_outlier_ejections_total").await,
        0.0
    );
}

/// A peer holding a real mesh certificate opens 4,096 streams, each with a partial head. The
/// sidecar holds at most `--inbound-max-streams` of them per connection, resets each after
/// `--inbound-head-timeout`, stays small, and keeps serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_heads_are_reset_and_cost_little() {
    let p = pair_opts(
        "stalled-heads",
        1,
        "1s",
        &[
            "--inbound-head-timeout",
            "2s",
            "--inbound-max-streams",
            "1024",
        ],
    )
    .await;
    let orders = &p.orders[0].1;
    let credentials = quic::mesh_credentials(&p.mesh.dir().join("sidecar-web-1"));
    let endpoint = quic::client_endpoint(Some(credentials));
    let conn = endpoint
        .connect(orders.addr("inbound"), "sinew.mesh")
        .unwrap()
        .await
        .expect("a mesh certificate is accepted");

    const STREAMS: usize = 4096;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let conn = conn.clone();
        tasks.spawn(async move {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            // A HEAD frame announcing 60,000 bytes, and 16 of them.
            let mut partial = vec![1u8];
            partial.extend_from_slice(&60_000u32.to_be_bytes());
            partial.extend_from_slice(&[0x0a; 16]);
            send.write_all(&partial).await.map_err(|e| e.to_string())?;
            match recv.read_to_end(1 << 16).await {
                Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => {
                    Ok(code.into_inner())
                }
                other => Err(format!("not reset: {other:?}")),
            }
        });
    }
    // While the first 1,024 stall, a normal request through the mesh answers within 1 s.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        get(&p.client, p.web.addr("outbound"), "orders", "/whoami"),
    )
    .await
    .expect("a normal request answered within 1 s")
    .unwrap();
    assert_eq!(answer.status, 200);

    let mut codes = std::collections::HashMap::<u64, usize>::new();
    let all = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(result) = tasks.join_next().await {
            match result.unwrap() {
                Ok(code) => *codes.entry(code).or_default() += 1,
                Err(e) => panic!("stream: {e}"),
            }
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "every stalled stream reset within 90 s: {codes:?}"
    );
    // Reset code 4: the head did not arrive in time.
    assert_eq!(codes.get(&4), Some(&STREAMS), "{codes:?}");
    let timeouts = metric(
        &p.client,
        orders.addr("admin"),
        "sinew_inbound_head_timeouts_total",
    )
    .await;
    assert_eq!(timeouts, STREAMS as f64);
    // Peak RSS over the sidecar's whole life, attack included.
    let peak_kib = proc_status_kib(orders.pid, "VmHWM");
    eprintln!("orders sidecar peak RSS: {} KiB", peak_kib);
    assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB");
    endpoint.close(0u32.into(), b"");
}

/// Past `--inbound-max-in-flight` requests with its app, a sidecar refuses at once with 503
/// `overloaded`, as a refusal in the framing: callers with another instance go there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_in_flight_cap_are_refused() {
    let p = pair_opts("in-flight-cap", 1, "1s", &["--inbound-max-in-flight", "2"]).await;
    let outbound = p.web.addr("outbound");
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let client = p.client.clone();
            tokio::spawn(async move { get(&client, outbound, "orders", "/slow?ms=1500").await })
        })
        .collect();
    // Both slow requests are with the app well before this one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = get(&p.client, outbound, "orders", "/whoami").await.unwrap();
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("sinew-error"), Some("overloaded"));
    assert!(
        refused.text().contains("in flight to this app"),
        "{}",
        refused.text()
    );
    for task in slow {
        assert_eq!(task.await.unwrap().unwrap().status, 200);
    }
    // With room again, it serves.
    let answer = get(&p.client, outbound, "orders", "/whoami").await.unwrap();
    assert_eq!(answer.status, 200);
    // Refused once, and once more on the retry the refusal allows (no other instance here).
    let overloaded = metric(
        &p.client,
        p.orders[0].1.addr("admin"),
        "sinew_inbound_overloaded_total",
    )
    .await;
    assert!(overloaded >= 1.0, "{overloaded}");
}
