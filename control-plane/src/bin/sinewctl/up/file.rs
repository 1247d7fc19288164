//! The `sinewctl up` file: one YAML document describing a local mesh.
//!
//! ```yaml
//! control:                      # optional; these are the defaults
//!   grpc: 127.0.0.1:7700        # the control plane's gRPC (sidecar + admin API); port 0 = any
//!   http: 127.0.0.1:7701        # its /metrics and /healthz
//! policy: |                     # optional; policy documents, applied at control-plane start
//!   kind: Service               #   and then its whole policy (`sinewctl apply` is refused)
//!   name: orders
//!   spec: {timeout: 2s, allow: [web]}
//! events:                       # optional; where the sidecars keep events
//!   backend: embedded           # default: each sidecar's own outbox. `nats`: NATS JetStream,
//!   url: nats://127.0.0.1:4222  #   at `url` (a running nats-server with -js), streams and
//!   prefix: sinew               #   subjects named by `prefix`
//! services:                     # at least one
//!   - name: orders              # a service name (a-z, 0-9, '-')
//!     instances: 2              # optional, default 1 (at most 32)
//!     command: [demo-orders]    # the app: program and arguments, no shell. A program without
//!                               # '/' is looked up next to sinewctl, then on PATH; a relative
//!                               # path is relative to this file's directory
//!     env: {LOG: debug}         # optional extra environment for the app
//!     app_protocol: http1       # optional: http1 or h2c (the sidecar's default when unset)
//!     health: /healthz          # optional: the sidecar health-checks the app with GET /healthz
//!                               # (`grpc` or `grpc:SERVICE`: grpc.health.v1 Check instead)
//!   - name: web
//!     command: [demo-web]
//!     app_port: 8080            # optional fixed app port of instance 1 (others: a free port)
//!     sidecar:                  # optional fixed sidecar addresses of instance 1 (others: port 0)
//!       outbound: 127.0.0.1:4140
//!       admin: 127.0.0.1:4191
//! ```
//!
//! Every app gets `PORT` (listen on 127.0.0.1:$PORT), `SINEW_OUTBOUND` (its sidecar's outbound
//! address), `HTTP_PROXY`/`http_proxy` (`http://` + that address), `NO_PROXY` (loopback),
//! `SINEW_SERVICE` and `SINEW_INSTANCE` (`web-1`). These win over `env`.

use serde::Deserialize;
use sinew_proto::policy;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Most instances of one service `up` starts: a local mesh, not a load test.
pub const MAX_INSTANCES: u32 = 32;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpFile {
    #[serde(default)]
    pub control: ControlSection,
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default)]
    pub events: EventsSection,
    pub services: Vec<ServiceSection>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventsBackend {
    #[default]
    Embedded,
    Nats,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSection {
    pub backend: EventsBackend,
    pub url: Option<String>,
    pub prefix: Option<String>,
}

impl EventsSection {
    /// The flags every sidecar gets.
    pub fn flags(&self) -> Vec<String> {
        match self.backend {
            EventsBackend::Embedded => Vec::new(),
            EventsBackend::Nats => {
                let mut flags = vec!["--events-backend".to_string(), "nats".to_string()];
                if let Some(url) = &self.url {
                    flags.extend(["--nats-url".to_string(), url.clone()]);
                }
                if let Some(prefix) = &self.prefix {
                    flags.extend(["--nats-prefix".to_string(), prefix.clone()]);
                }
                flags
            }
        }
    }

    fn validate(&self) -> Result<(), String> {
        if self.backend == EventsBackend::Embedded && (self.url.is_some() || self.prefix.is_some())
        {
            return Err("events: `url` and `prefix` go with `backend: nats`".into());
        }
        if let Some(url) = &self.url
            && !(url.starts_with("nats://") || url.starts_with("tls://"))
        {
            return Err(format!(
                "events.url: `{url}` is not a nats:// or tls:// URL"
            ));
        }
        if let Some(prefix) = &self.prefix
            && (prefix.is_empty()
                || prefix.len() > 64
                || !prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
        {
            return Err(format!(
                "events.prefix: `{prefix}`: 1-64 characters of A-Z, a-z, 0-9, '_' and '-'"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSection {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            grpc: SocketAddr::from(([127, 0, 0, 1], 7700)),
            http: SocketAddr::from(([127, 0, 0, 1], 7701)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub name: String,
    #[serde(default = "one")]
    pub instances: u32,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub app_protocol: Option<AppProtocol>,
    #[serde(default)]
    pub app_port: Option<u16>,
    #[serde(default)]
    pub sidecar: SidecarSection,
    /// The app's health check: a path (`/healthz`), or `grpc` / `grpc:SERVICE`.
    #[serde(default)]
    pub health: Option<String>,
}

impl ServiceSection {
    /// The sidecar flags that turn the health check on.
    pub fn health_flags(&self) -> Vec<String> {
        health_flags(self.health.as_deref())
    }
}

/// The sidecar flags for a health check written as in a `sinewctl up` file: a path
/// (`/healthz`), `grpc` or `grpc:SERVICE`; none for `None`.
pub fn health_flags(check: Option<&str>) -> Vec<String> {
    match check {
        None => Vec::new(),
        Some("grpc") => vec!["--health-grpc".into()],
        Some(check) => match check.strip_prefix("grpc:") {
            Some(service) => vec!["--health-grpc".into(), service.into()],
            None => vec!["--health-http".into(), check.into()],
        },
    }
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    Http1,
    H2c,
}

impl AppProtocol {
    pub fn as_flag(self) -> &'static str {
        match self {
            AppProtocol::Http1 => "http1",
            AppProtocol::H2c => "h2c",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarSection {
    pub outbound: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

impl UpFile {
    /// Reads, parses and validates `path`; errors name the file and the field.
    pub fn load(path: &Path) -> anyhow::Result<UpFile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        UpFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<UpFile, String> {
        let file: UpFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        file.validate()?;
        Ok(file)
    }

    fn validate(&self) -> Result<(), String> {
        if self.services.is_empty() {
            return Err("services: list at least one service".into());
        }
        if let Some(text) = &self.policy {
            policy::parse_documents(text).map_err(|e| format!("policy: {e}"))?;
        }
        self.events.validate()?;
        let mut fixed: Vec<(SocketAddr, String)> = vec![
            (self.control.grpc, "control.grpc".into()),
            (self.control.http, "control.http".into()),
        ];
        for (i, service) in self.services.iter().enumerate() {
            let at = format!("services[{i}]");
            policy::validate_name(&service.name).map_err(|r| format!("{at}.name: {r}"))?;
            if self.services[..i].iter().any(|s| s.name == service.name) {
                return Err(format!(
                    "{at}.name: service `{}` is listed twice",
                    service.name
                ));
            }
            if !(1..=MAX_INSTANCES).contains(&service.instances) {
                return Err(format!(
                    "{at}.instances: must be between 1 and {MAX_INSTANCES}"
                ));
            }
            match service.command.first() {
                None => {
                    return Err(format!(
                        "{at}.command: give the program to run, e.g. [demo-orders]"
                    ));
                }
                Some(program) if program.trim().is_empty() => {
                    return Err(format!("{at}.command[0]: the program name is empty"));
                }
                Some(_) => {}
            }
            for key in service.env.keys() {
                if key.is_empty() || key.contains('=') || key.contains('\0') {
                    return Err(format!("{at}.env: `{key}` is not a variable name"));
                }
            }
            if let Some(check) = &service.health
                && !(check.starts_with('/') || check == "grpc" || check.starts_with("grpc:"))
            {
                return Err(format!(
                    "{at}.health: `{check}` is neither a path (/healthz) nor grpc[:SERVICE]"
                ));
            }
            if service.app_port == Some(0) {
                return Err(format!("{at}.app_port: leave it out to pick a free port"));
            }
            if let Some(port) = service.app_port {
                fixed.push((
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    format!("{at}.app_port"),
                ));
            }
            if let Some(addr) = service.sidecar.outbound {
                fixed.push((addr, format!("{at}.sidecar.outbound")));
            }
            if let Some(addr) = service.sidecar.admin {
                fixed.push((addr, format!("{at}.sidecar.admin")));
            }
        }
        for (i, (addr, field)) in fixed.iter().enumerate() {
            if addr.port() == 0 {
                continue;
            }
            if let Some((_, other)) = fixed[..i].iter().find(|(a, _)| a.port() == addr.port()) {
                return Err(format!(
                    "{field}: port {} is already used by {other}",
                    addr.port()
                ));
            }
        }
        Ok(())
    }
}

/// Where a program named in the file (or `sinew-control`, `sinew-sidecar`) is found: a name
/// without `/` next to sinewctl's own executable first, then on `PATH`; a path with `/` as is
/// when absolute, else relative to `base` (the up file's directory).
pub fn find_program(
    name: &str,
    exe_dir: Option<&Path>,
    path_var: Option<&std::ffi::OsStr>,
    base: &Path,
) -> Result<PathBuf, String> {
    if name.contains('/') {
        let path = base.join(name);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!("`{}` is not an executable file", path.display()))
        };
    }
    let beside = exe_dir.map(|dir| dir.join(name));
    if let Some(path) = beside.iter().find(|p| is_executable(p)) {
        return Ok(path.clone());
    }
    if let Some(path_var) = path_var {
        for dir in std::env::split_paths(path_var) {
            let path = dir.join(name);
            if is_executable(&path) {
                return Ok(path);
            }
        }
    }
    let beside = exe_dir
        .map(|d| format!("{} or ", d.display()))
        .unwrap_or_default();
    Err(format!("cannot find `{name}` in {beside}PATH"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICKSTART: &str = include_str!("../../../../../examples/quickstart.yaml");

    #[test]
    fn quickstart_parses() {
        let file = UpFile::parse(QUICKSTART).unwrap();
        assert_eq!(file.control, ControlSection::default());
        assert_eq!(file.services.len(), 3);
        let orders = &file.services[0];
        assert_eq!((orders.name.as_str(), orders.instances), ("orders", 2));
        let billing = &file.services[1];
        assert_eq!((billing.name.as_str(), billing.instances), ("billing", 2));
        let web = &file.services[2];
        assert_eq!(web.app_port, Some(8080));
        assert_eq!(
            web.sidecar.outbound,
            Some("127.0.0.1:4140".parse().unwrap())
        );
        assert_eq!(web.sidecar.admin, Some("127.0.0.1:4191".parse().unwrap()));
        let docs = policy::parse_documents(file.policy.as_deref().unwrap()).unwrap();
        assert_eq!(docs.len(), 4);
        assert_eq!(docs[3].kind, policy::Kind::Subscription);
    }

    #[test]
    fn minimal_file_takes_defaults() {
        let file = UpFile::parse("services: [{name: a, command: [x, --flag]}]").unwrap();
        let a = &file.services[0];
        assert_eq!(a.instances, 1);
        assert_eq!(a.command, ["x", "--flag"]);
        assert_eq!(a.app_protocol, None);
        assert_eq!(a.sidecar, SidecarSection::default());
        assert!(file.policy.is_none());
    }

    fn error(text: &str) -> String {
        UpFile::parse(text).unwrap_err()
    }

    #[test]
    fn the_events_backend_becomes_sidecar_flags() {
        let file = UpFile::parse("services: [{name: a, command: [x]}]").unwrap();
        assert!(file.events.flags().is_empty());
        let file = UpFile::parse(
            "events: {backend: nats, url: 'nats://127.0.0.1:4333', prefix: demo}\nservices: [{name: a, command: [x]}]",
        )
        .unwrap();
        assert_eq!(
            file.events.flags(),
            [
                "--events-backend",
                "nats",
                "--nats-url",
                "nats://127.0.0.1:4333",
                "--nats-prefix",
                "demo"
            ]
        );
        let e = error("events: {backend: kafka}\nservices: [{name: a, command: [x]}]");
        assert!(e.contains("events") && e.contains("kafka"), "{e}");
        let e = error("events: {url: 'nats://x:1'}\nservices: [{name: a, command: [x]}]");
        assert!(e.contains("backend: nats"), "{e}");
        let e =
            error("events: {backend: nats, url: 'http://x'}\nservices: [{name: a, command: [x]}]");
        assert!(e.contains("events.url"), "{e}");
        let e =
            error("events: {backend: nats, prefix: 'a.b'}\nservices: [{name: a, command: [x]}]");
        assert!(e.contains("events.prefix"), "{e}");
    }

    #[test]
    fn health_checks_become_sidecar_flags() {
        let file = UpFile::parse(
            "services: [{name: a, command: [x], health: /healthz}, {name: b, command: [x], health: grpc}, {name: c, command: [x], health: 'grpc:shop.Cart'}, {name: d, command: [x]}]",
        )
        .unwrap();
        let flags: Vec<Vec<String>> = file.services.iter().map(|s| s.health_flags()).collect();
        assert_eq!(flags[0], ["--health-http", "/healthz"]);
        assert_eq!(flags[1], ["--health-grpc"]);
        assert_eq!(flags[2], ["--health-grpc", "shop.Cart"]);
        assert!(flags[3].is_empty());
        let e = error("services: [{name: a, command: [x], health: healthz}]");
        assert!(e.contains("services[0].health"), "{e}");
    }

    #[test]
    fn bad_files_name_the_field() {
        let e = error("services: [{name: a, command: [x], instnces: 2}]");
        assert!(
            e.contains("services[0]") && e.contains("unknown field `instnces`"),
            "{e}"
        );
        let e = error("services: [{name: a, command: [x], app_protocol: h3}]");
        assert!(
            e.contains("services[0].app_protocol") && e.contains("h3"),
            "{e}"
        );
        let e = error("control: {grpc: localhost}\nservices: [{name: a, command: [x]}]");
        assert!(e.contains("control.grpc"), "{e}");
        let e = error("services: [{name: Web, command: [x]}]");
        assert!(e.starts_with("services[0].name:"), "{e}");
        let e = error("services: [{name: a, command: [x]}, {name: a, command: [y]}]");
        assert!(e.contains("services[1].name") && e.contains("twice"), "{e}");
        let e = error("services: [{name: a, command: []}]");
        assert!(e.starts_with("services[0].command:"), "{e}");
        let e = error("services: [{name: a, command: [x], instances: 0}]");
        assert!(e.starts_with("services[0].instances:"), "{e}");
        let e = error("services: []");
        assert!(e.starts_with("services:"), "{e}");
        let e = error("control: {}\n");
        assert!(e.contains("missing field `services`"), "{e}");
        let e = error(
            "policy: \"kind: Service\\nname: a\\nspec: {timeout: 2}\"\nservices: [{name: a, command: [x]}]",
        );
        assert!(
            e.starts_with("policy: document 1 (Service a): spec.timeout:"),
            "{e}"
        );
        let e = error("services: [{name: a, command: [x], app_port: 7700}]");
        assert!(
            e.contains("services[0].app_port: port 7700 is already used by control.grpc"),
            "{e}"
        );
        // Port 0 (any free port) may appear many times.
        assert!(UpFile::parse("services: [{name: a, command: [x], sidecar: {outbound: '127.0.0.1:0', admin: '127.0.0.1:0'}}]").is_ok());
    }

    #[test]
    fn programs_are_found_beside_sinewctl_then_on_path() {
        use std::os::unix::fs::PermissionsExt;
        let root = std::env::temp_dir().join(format!("sinewctl-find-{}", std::process::id()));
        let (beside, on_path, base) = (root.join("bin"), root.join("path"), root.join("conf"));
        for dir in [&beside, &on_path, &base] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let make = |path: PathBuf, mode| {
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let both = make(beside.join("tool"), 0o755);
        make(on_path.join("tool"), 0o755);
        let only_path = make(on_path.join("other"), 0o755);
        make(beside.join("other"), 0o644); // not executable: skipped
        let local = make(base.join("app.sh"), 0o755);
        let path_var = std::env::join_paths([&on_path]).unwrap();
        let find = |name: &str| find_program(name, Some(&beside), Some(&path_var), &base);

        assert_eq!(find("tool"), Ok(both));
        assert_eq!(find("other"), Ok(only_path));
        assert_eq!(find("./app.sh"), Ok(base.join("./app.sh")));
        assert_eq!(find(local.to_str().unwrap()), Ok(local));
        assert!(
            find("missing")
                .unwrap_err()
                .contains("cannot find `missing`")
        );
        assert!(find("./nope.sh").unwrap_err().contains("not an executable"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
