//! Micro-benchmarks of the outbound's per-request work: find the service in the snapshot,
//! pick an endpoint (P2C over 100 endpoints by peak-EWMA cost), and strip hop-by-hop headers.
//!
//!     cargo bench -p sinew-sidecar

use arc_swap::ArcSwap;
use criterion::{Criterion, criterion_group, criterion_main};
use sinew_proto::v1::{Endpoint, ServiceResource, Update};
use sinew_sidecar::outbound::service_name;
use sinew_sidecar::snapshot::Snapshot;
use sinew_sidecar::transport::frame::to_proto_headers;
use std::hint::black_box;
use std::time::Instant;

fn resource(name: &str, endpoints: usize) -> ServiceResource {
    ServiceResource {
        name: name.into(),
        policy_json: String::new(),
        endpoints: (0..endpoints)
            .map(|i| Endpoint {
                node_id: format!("{name}-{i}"),
                addr: format!("127.0.{}.{}:4143", i / 250, i % 250 + 1),
                identity: format!("spiffe://sinew.local/svc/{name}"),
                ..Default::default()
            })
            .collect(),
    }
}

/// 100 services of 3 endpoints each, and `orders` with 100.
fn snapshot() -> Snapshot {
    let mut services: Vec<ServiceResource> =
        (0..100).map(|i| resource(&format!("svc-{i}"), 3)).collect();
    services.push(resource("orders", 100));
    Snapshot::default()
        .apply(&Update {
            version: 1,
            nonce: "n".into(),
            full: true,
            services,
            removed_services: Vec::new(),
            base_version: 0,
            ..Update::default()
        })
        .expect("a valid snapshot")
}

fn benches(c: &mut Criterion) {
    let current = ArcSwap::from_pointee(snapshot());
    let request = http::Request::get("/items/1")
        .header("host", "orders:8080")
        .body(())
        .expect("request");
    c.bench_function("snapshot lookup (Host -> service, 101 services)", |b| {
        b.iter(|| {
            let name = service_name(black_box(&request)).expect("a host");
            current.load().services.get(&name).cloned()
        })
    });

    let snapshot = current.load_full();
    let orders = snapshot.services.get("orders").expect("orders").clone();
    let now = Instant::now();
    c.bench_function("endpoint pick (P2C over 100 endpoints)", |b| {
        b.iter(|| orders.pick(black_box(now), &[]))
    });

    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        ("host", "orders"),
        ("user-agent", "bench/1.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, br"),
        ("content-type", "application/json"),
        ("authorization", "Bearer abcdefghijklmnopqrstuvwxyz"),
        ("x-request-id", "0af7651916cd43dd8448eb211c80319c"),
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("connection", "keep-alive, x-private"),
        ("keep-alive", "timeout=5"),
        ("x-private", "hop"),
        ("te", "trailers"),
    ] {
        headers.append(name, value.parse().expect("header value"));
    }
    c.bench_function("header rewriting (12 headers, hop-by-hop stripped)", |b| {
        b.iter(|| to_proto_headers(black_box(&headers), true))
    });
}

criterion_group!(outbound, benches);
criterion_main!(outbound);
