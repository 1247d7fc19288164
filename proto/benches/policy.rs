//! Micro-benchmark of policy validation: `parse_documents` on one document and on 100.
//!
//!     cargo bench -p sinew-proto

use criterion::{Criterion, criterion_group, criterion_main};
use sinew_proto::policy::parse_documents;
use std::hint::black_box;

const ONE: &str = "kind: Service
name: orders
spec:
  timeout: 2s
  retries: {attempts: 2, per_try_timeout: 500ms, on: [reset, 503],
            budget: {ratio: 0.2, min_per_second: 10}}
  outlier: {consecutive_failures: 5, base_ejection: 5s, max_ejection: 60s, max_ejection_percent: 50}
  max_concurrent: 1024
  allow: [web, billing]
  calls: [inventory, payments]
";

fn benches(c: &mut Criterion) {
    c.bench_function("policy validation (1 document)", |b| {
        b.iter(|| parse_documents(black_box(ONE)).expect("valid"))
    });
    let many: String = (0..100)
        .map(|i| ONE.replace("name: orders", &format!("name: svc-{i}")) + "---\n")
        .collect();
    c.bench_function("policy validation (100 documents)", |b| {
        b.iter(|| parse_documents(black_box(&many)).expect("valid"))
    });
}

criterion_group!(policy, benches);
criterion_main!(policy);
