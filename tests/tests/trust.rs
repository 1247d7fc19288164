//! Trust that lasts: certificates renewed under load with no failed request, a cached
//! certificate near its end renewed at start, an expired one reported as not ready, private
//! files on disk, and `sinewctl check`. Real control plane, sidecars and QUIC/TLS.

#![allow(clippy::unwrap_used)]

use sinew_e2e::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// What a new handshake with the sidecar at `inbound` is offered: (serial, not_after).
/// The probe has no client certificate, so the sidecar ends the handshake after sending
/// its own; that is enough to see it.
async fn served_certificate(inbound: SocketAddr) -> (String, i64) {
    let recorder = Arc::new(quic::AnyServer::default());
    let endpoint = quic::client_endpoint_with(recorder.clone(), None);
    let attempt = async {
        let conn = endpoint.connect(inbound, "sinew.mesh").unwrap().await?;
        // Refused or not, it is over once the server has had its say.
        let _ = conn.accept_bi().await;
        Ok::<_, quinn::ConnectionError>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), attempt).await;
    endpoint.close(0u32.into(), b"");
    let der = recorder
        .presented()
        .expect("the sidecar presented no certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    (
        cert.raw_serial_as_string().replace(':', ""),
        cert.validity().not_after.timestamp(),
    )
}

/// `web` (no app) and one `orders` instance, on a control plane started with `control_flags`.
async fn mesh_with(test: &str, control_flags: &[&str]) -> (Mesh, Proc, Proc, Proc, HttpClient) {
    let mesh = Mesh::start_opts(test, "1s", control_flags);
    let client = http_client();
    let app = mesh.app("orders-1");
    let orders = mesh.sidecar("orders-1", "orders", app.addr("http"), &[]);
    let web = mesh.sidecar("web-1", "web", "127.0.0.1:9".parse().unwrap(), &[]);
    wait_ready(&client, &orders).await;
    wait_ready(&client, &web).await;
    wait_endpoints(&client, &web, "orders", 1).await;
    (mesh, app, orders, web, client)
}

/// The sidecar's expiry gauge and the certificate a new handshake gets, read so that no
/// renewal falls between them.
async fn expiry_and_served(client: &HttpClient, sidecar: &Proc) -> (i64, (String, i64)) {
    loop {
        let before = metric(
            client,
            sidecar.addr("admin"),
            "sinew_certificate_expiry_timestamp_seconds",
        )
        .await as i64;
        let served = served_certificate(sidecar.addr("inbound")).await;
        let after = metric(
            client,
            sidecar.addr("admin"),
            "sinew_certificate_expiry_timestamp_seconds",
        )
        .await as i64;
        if before == after {
            return (after, served);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_under_load_without_a_failed_request() {
    // 12 s certificates: renewed about every 8 s, so 60 s of traffic sees about 7 renewals
    // per sidecar (the 30 s over 3 minutes, compressed).
    let (mesh, _app, orders, web, client) = mesh_with("renewal", &["--cert-lifetime", "12s"]).await;
    let probes = {
        let inbounds = [
            ("orders-1", orders.addr("inbound")),
            ("web-1", web.addr("inbound")),
        ];
        tokio::spawn(async move {
            // Each probe is a new handshake; what it is offered must never be expired.
            let mut seen: Vec<(&str, i64, String, i64)> = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(58);
            while Instant::now() < deadline {
                for (name, addr) in inbounds {
                    let at = now_unix();
                    let (serial, not_after) = served_certificate(addr).await;
                    seen.push((name, at, serial, not_after));
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            seen
        })
    };
    let report = steady_load(
        web.addr("outbound"),
        "orders",
        "/whoami",
        50,
        Duration::from_secs(60),
        |_| {},
    )
    .await;
    let seen = probes.await.unwrap();
    let mut renewals = Vec::new();
    for sidecar in [&orders, &web] {
        let admin = sidecar.addr("admin");
        renewals.push((
            sidecar.name.clone(),
            metric(&client, admin, "sinew_certificate_renewals_total").await,
            metric(&client, admin, "sinew_certificate_renewal_failures_total").await,
        ));
    }
    eprintln!(
        "FIGURES | renewal under load | {} | renewals, failures: {renewals:?}",
        report.summary()
    );
    assert_eq!(
        report.ok,
        report.sent,
        "failed requests: {}",
        report.summary()
    );
    for (name, renewed, _) in &renewals {
        assert!(
            *renewed >= 4.0,
            "{name} renewed {renewed} times in 60 s of 12 s certificates"
        );
    }
    for name in ["orders-1", "web-1"] {
        let mine: Vec<_> = seen.iter().filter(|s| s.0 == name).collect();
        let serials: std::collections::BTreeSet<&str> = mine.iter().map(|s| s.2.as_str()).collect();
        assert!(
            serials.len() >= 4,
            "{name}: new handshakes saw only {} certificates: {mine:?}",
            serials.len()
        );
        for (_, at, serial, not_after) in &mine {
            assert!(
                not_after > at,
                "{name} offered the expired certificate {serial} at {at}"
            );
        }
    }
    // A new handshake now is offered the certificate the sidecar renewed last.
    for sidecar in [&orders, &web] {
        let (expiry, (serial, not_after)) = expiry_and_served(&client, sidecar).await;
        assert_eq!(
            not_after, expiry,
            "{} serves {serial}, not its newest certificate",
            sidecar.name
        );
    }
    drop(mesh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_certificate_with_under_30_percent_left_is_renewed_at_start() {
    let mesh = Mesh::start_opts("renew-at-start", "1s", &["--cert-lifetime", "20s"]);
    let client = http_client();
    let app = mesh.app("orders-1");
    let mut orders = mesh.sidecar("orders-1", "orders", app.addr("http"), &[]);
    wait_ready(&client, &orders).await;
    let cache = mesh.dir().join("sidecar-orders-1/identity.json");
    let cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    let not_after = cached["not_after_unix"].as_i64().unwrap();
    assert!(orders.terminate().success());
    // 20 s of life plus 2 s backdated: under 30% (6.6 s) is left 5 s before the end.
    while now_unix() < not_after - 5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let orders = mesh.sidecar("orders-1", "orders", app.addr("http"), &[]);
    wait_ready(&client, &orders).await;
    let admin = orders.addr("admin");
    wait_until("a renewal at start", Duration::from_secs(10), || async {
        metric(&client, admin, "sinew_certificate_renewals_total").await >= 1.0
    })
    .await;
    let (expiry, (_, served)) = expiry_and_served(&client, &orders).await;
    assert!(
        expiry > not_after,
        "still the cached certificate: {expiry} <= {not_after}"
    );
    assert_eq!(served, expiry);
    assert!(
        orders.log_text().contains("using the cached certificate"),
        "the restart did not start from the cache:\n{}",
        orders.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_without_a_successor_is_not_ready_until_renewed() {
    let mut mesh = Mesh::start_opts("expired", "1s", &["--cert-lifetime", "10s"]);
    let client = http_client();
    let app = mesh.app("orders-1");
    let orders = mesh.sidecar("orders-1", "orders", app.addr("http"), &[]);
    wait_ready(&client, &orders).await;
    let admin = orders.addr("admin");
    mesh.control_mut().kill();
    wait_until(
        "/ready to report the expired certificate",
        Duration::from_secs(30),
        || async {
            let answer = get(&client, admin, "localhost", "/ready").await.unwrap();
            answer.status == 503 && answer.text().contains("certificate expired")
        },
    )
    .await;
    assert!(metric(&client, admin, "sinew_certificate_renewal_failures_total").await >= 1.0);
    // Retried with backoff: the control plane's return brings a new certificate.
    mesh.start_control();
    wait_ready(&client, &orders).await;
    assert!(metric(&client, admin, "sinew_certificate_renewals_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_tokens_on_disk_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let (mesh, _app, _orders, _web, _client) = mesh_with("modes", &[]).await;
    let mode = |path: &str| {
        std::fs::metadata(mesh.dir().join(path))
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    let expected = [
        ("control", 0o700),
        ("control/control.redb", 0o600),
        ("control/admin-token", 0o600),
        ("control/join-token", 0o600),
        ("sidecar-orders-1", 0o700),
        ("sidecar-orders-1/identity.json", 0o600),
        ("sidecar-web-1", 0o700),
        ("sidecar-web-1/identity.json", 0o600),
    ];
    let found: Vec<(&str, u32)> = expected.iter().map(|(p, _)| (*p, mode(p))).collect();
    assert_eq!(
        found,
        expected,
        "modes (octal {:?})",
        found
            .iter()
            .map(|(p, m)| format!("{p} {m:o}"))
            .collect::<Vec<_>>()
    );
}

fn stdout_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_a_ca_about_to_expire() {
    let (mesh, _app, _orders, _web, _client) =
        mesh_with("check-ca", &["--ca-lifetime", "10m"]).await;
    let output = mesh.sinewctl(&["check"]);
    let text = stdout_of(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with("FAIL  the mesh CA expires in 9m")
            || text.starts_with("FAIL  the mesh CA expires in 10m0s"),
        "{text}"
    );
    assert!(text.contains("(less than 30 days)"), "{text}");
    assert!(text.ends_with("check failed: 1 problem\n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_healthy_mesh_and_fails_on_a_lost_sidecar() {
    let (mut mesh, _app, mut orders, _web, _client) = mesh_with("check-ok", &[]).await;
    let mut text = String::new();
    for _ in 0..100 {
        let output = mesh.sinewctl(&["check"]);
        text = stdout_of(&output);
        if output.status.success() && text.contains("2 sidecar certificates") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Ten years, less the moments since the CA was made (within its first second: none).
    let text = text.replacen("expires in 3650d0h", "expires in 3649d23h", 1);
    assert_eq!(
        text,
        "ok    the mesh CA expires in 3649d23h\n\
         ok    2 sidecars connected\n\
         ok    no sidecar refuses its configuration\n\
         ok    2 sidecar certificates have at least 20% of their life left\n\
         check passed\n"
    );
    // `status` shows each certificate's expiry, and the CA's.
    let status = stdout_of(&mesh.sinewctl(&["status"]));
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("SIDECAR") && l.contains("CERT EXPIRES")),
        "{status}"
    );
    let web = status.lines().find(|l| l.starts_with("web-1")).unwrap();
    assert!(
        // 24 h, less the moments since it was issued (within its first second: none).
        web.contains("in 23h59m") || web.contains("in 1d0h"),
        "{status}"
    );
    assert!(
        status.ends_with("mesh CA expires in 3649d23h\n")
            || status.ends_with("mesh CA expires in 3650d0h\n"),
        "{status}"
    );

    orders.kill();
    let mut failed = None;
    for _ in 0..100 {
        let output = mesh.sinewctl(&["check"]);
        if output.status.code() == Some(1) {
            failed = Some(stdout_of(&output));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = failed.expect("check kept passing with a sidecar gone");
    assert!(
        text.starts_with(
            "FAIL  sidecar orders-1 (orders) is disconnected from the control plane\n"
        ),
        "{text}"
    );
    assert!(text.ends_with("check failed: 1 problem\n"), "{text}");
    mesh.control_mut().terminate();
}
