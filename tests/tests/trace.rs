//! W3C trace context through the mesh (issue 16, item 6): kept when the app sends one, a new
//! span id at each sidecar, created at the first sidecar when absent.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sinew_e2e::*;

/// `GET /echo` on orders through web's sidecar; the `traceparent` the app received.
async fn echoed_traceparent(p: &Pair, sent: Option<&str>) -> String {
    let mut request = http::Request::get(format!("http://{}/echo", p.web.addr("outbound")))
        .header("host", "orders")
        .header("tracestate", "vendor=1");
    if let Some(sent) = sent {
        request = request.header("traceparent", sent);
    }
    let response = p
        .client
        .request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let _ = response.into_body().collect().await;
    if sent.is_some() {
        assert_eq!(headers["echo-tracestate"], "vendor=1", "tracestate is kept");
    } else {
        assert!(
            headers.get("echo-tracestate").is_none(),
            "a new trace drops tracestate"
        );
    }
    headers["echo-traceparent"].to_str().unwrap().to_string()
}

fn fields(traceparent: &str) -> Vec<String> {
    let parts: Vec<String> = traceparent.split('-').map(str::to_string).collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    parts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_is_kept_with_a_new_span_per_hop_or_created() {
    let p = pair("trace", 1).await;
    let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let got = fields(&echoed_traceparent(&p, Some(sent)).await);
    assert_eq!(
        got[1], "4bf92f3577b34da6a3ce929d0e0e4736",
        "the trace is kept"
    );
    assert_ne!(got[2], "00f067aa0ba902b7", "each hop has its own span id");
    assert_eq!(got[3], "01");

    let first = fields(&echoed_traceparent(&p, None).await);
    let second = fields(&echoed_traceparent(&p, None).await);
    assert_ne!(
        first[1], second[1],
        "each request without one starts its own trace"
    );
    assert_ne!(first[1], "0".repeat(32));
}
