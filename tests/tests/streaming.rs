//! A streamed response crosses the mesh as it is written, never gathered: server-sent events
//! reach the client one by one (issue 17, item 4).

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use sinew_e2e::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_one_by_one() {
    let p = pair("sse", 1).await;
    let request = http::Request::get(format!("http://{}/sse?n=10&ms=100", p.web.addr("outbound")))
        .header("host", "orders")
        .header("accept", "text/event-stream")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = p.client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let started = Instant::now();
    let mut body = response.into_body();
    let mut text = String::new();
    // When each event was complete at the client.
    let mut arrivals = Vec::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                text.push_str(std::str::from_utf8(&data).unwrap());
                while arrivals.len() < text.matches("\n\n").count() {
                    arrivals.push(started.elapsed());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the stream ends");
    assert_eq!(arrivals.len(), 10, "{text:?}");
    for i in 0..10 {
        assert!(
            text.contains(&format!("id: {i}\ndata: event {i}\n\n")),
            "{text:?}"
        );
    }
    // The app writes an event every 100 ms. Gathered by any hop, they would arrive together
    // at the end; streamed, they arrive spread out, about 100 ms apart.
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("arrivals: {arrivals:?}");
    let spread = gaps
        .iter()
        .filter(|gap| **gap >= Duration::from_millis(40))
        .count();
    assert!(
        spread >= 7,
        "events arrived bunched together: gaps {gaps:?}"
    );
    assert!(
        arrivals[0] < arrivals[9] / 2,
        "the first event came with the last: {arrivals:?}"
    );
}
