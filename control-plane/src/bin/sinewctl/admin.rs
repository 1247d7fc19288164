//! The admin API commands: one gRPC call each, with the bearer token, and errors a user can
//! act on (unreachable control plane, refused token, invalid document) instead of transport
//! jargon.

use crate::table::{Table, ago};
use anyhow::{Context, anyhow, bail};
use sinew_proto::v1::admin_api_client::AdminApiClient;
use sinew_proto::v1::events_request;
use sinew_proto::v1::{
    ApplyRequest, ApplyResponse, DeadLetter, DeadLettersRequest, DeleteRequest, EventsRequest,
    GetRequest, InstanceInfo, ListServicesRequest, ServiceInfo, SidecarStatus, StatusRequest,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// Which control plane, and how to prove we may administer it.
pub struct Target {
    pub addr: String,
    pub token_file: PathBuf,
}

pub(crate) struct Client {
    pub(crate) inner: AdminApiClient<Channel>,
    bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    addr: String,
    token_file: PathBuf,
}

impl Client {
    pub(crate) async fn connect(target: &Target) -> anyhow::Result<Client> {
        let token = std::fs::read_to_string(&target.token_file).with_context(|| {
            format!(
                "cannot read the admin token from {} (pass --token-file or set SINEW_ADMIN_TOKEN_FILE; \
                 sinew-control writes it to <data-dir>/admin-token)",
                target.token_file.display()
            )
        })?;
        let token = token.trim();
        if token.is_empty() {
            bail!(
                "the admin token file {} is empty",
                target.token_file.display()
            );
        }
        let bearer = format!("Bearer {token}").parse().map_err(|_| {
            anyhow!(
                "the admin token in {} has characters a header cannot carry",
                target.token_file.display()
            )
        })?;
        let addr = target.addr.trim_start_matches("http://").to_string();
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|_| anyhow!("`{addr}` is not a control-plane address (expected host:port)"))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        let channel = endpoint.connect().await.map_err(|e| {
            anyhow!(
                "cannot reach the control plane at {addr}: {} (is it running? start a local mesh with \
                 `sinewctl up FILE`, or pass --control / set SINEW_CONTROL)",
                root_cause(&e)
            )
        })?;
        Ok(Client {
            inner: AdminApiClient::new(channel),
            bearer,
            addr,
            token_file: target.token_file.clone(),
        })
    }

    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.bearer.clone());
        request
    }

    /// Turns a failed call into a message that says what to do.
    pub(crate) fn explain(&self, status: Status) -> anyhow::Error {
        let message = status.message();
        match status.code() {
            Code::Unauthenticated | Code::PermissionDenied => anyhow!(
                "the control plane at {} refused the admin token from {}: {message}",
                self.addr,
                self.token_file.display()
            ),
            Code::Unavailable => {
                anyhow!("cannot reach the control plane at {}: {message}", self.addr)
            }
            Code::DeadlineExceeded => {
                anyhow!("the control plane at {} did not answer in time", self.addr)
            }
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists => {
                anyhow!("{message}")
            }
            Code::Internal | Code::Unknown | Code::Unimplemented => anyhow!(
                "{} answered {:?}: {message} (is it the control plane's gRPC address?)",
                self.addr,
                status.code()
            ),
            code => anyhow!("the control plane answered {code:?}: {message}"),
        }
    }
}

/// The innermost error's text: "Connection refused (os error 111)" rather than "transport error".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The documents of `-f FILE` (`-` is stdin).
fn read_documents(file: &Path) -> anyhow::Result<String> {
    if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the documents from stdin")?;
        Ok(text)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
    }
}

fn source_name(file: &Path) -> String {
    if file.as_os_str() == "-" {
        "stdin".into()
    } else {
        file.display().to_string()
    }
}

/// How `sinewctl apply` applies.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyMode {
    /// Refuse references to services that have neither policy nor instances.
    pub strict: bool,
    /// Show what would change, change nothing.
    pub dry_run: bool,
}

/// Sends the documents of `file` to `Apply`; `None` when the file holds none.
async fn send_apply(
    target: &Target,
    file: &Path,
    mode: ApplyMode,
) -> anyhow::Result<Option<ApplyResponse>> {
    let yaml = read_documents(file)?;
    let mut client = Client::connect(target).await?;
    let request = client.request(ApplyRequest {
        yaml,
        strict: mode.strict,
        dry_run: mode.dry_run,
    });
    let response = client
        .inner
        .apply(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    if response.documents.is_empty() {
        return Ok(None);
    }
    Ok(Some(response))
}

/// `sinewctl apply -f FILE [--strict] [--dry-run]`.
pub async fn apply(target: &Target, file: &Path, mode: ApplyMode) -> anyhow::Result<()> {
    let Some(response) = send_apply(target, file, mode).await? else {
        println!("nothing to apply: {} holds no documents", source_name(file));
        return Ok(());
    };
    for warning in &response.warnings {
        eprintln!("warning: {warning}");
    }
    let dry = if mode.dry_run { " (dry run)" } else { "" };
    for doc in &response.documents {
        println!(
            "{}/{} {}{dry}",
            doc.kind.to_ascii_lowercase(),
            doc.name,
            doc.outcome
        );
    }
    if mode.dry_run {
        print!(
            "{}",
            document_diffs(&response.documents, &source_name(file))
        );
        println!("dry run: nothing changed (version {})", response.version);
        if !response.policy_source.is_empty() {
            println!(
                "note: this control plane takes its policy from {}: apply would be refused there",
                response.policy_source
            );
        }
    } else {
        println!("version {}", response.version);
    }
    Ok(())
}

/// `sinewctl diff -f FILE`: what `apply` would change, as a diff per document. Returns
/// whether anything differs.
pub async fn diff(target: &Target, file: &Path) -> anyhow::Result<bool> {
    let mode = ApplyMode {
        strict: false,
        dry_run: true,
    };
    let Some(response) = send_apply(target, file, mode).await? else {
        println!(
            "nothing to compare: {} holds no documents",
            source_name(file)
        );
        return Ok(false);
    };
    for warning in &response.warnings {
        eprintln!("warning: {warning}");
    }
    let text = document_diffs(&response.documents, &source_name(file));
    if text.is_empty() {
        println!("no differences");
        return Ok(false);
    }
    print!("{text}");
    Ok(true)
}

/// Per created or changed document, the diff from the stored one to the new one.
fn document_diffs(documents: &[sinew_proto::v1::AppliedDocument], source: &str) -> String {
    documents
        .iter()
        .map(|doc| {
            let what = format!("{} {}", doc.kind, doc.name);
            let live = if doc.live_yaml.is_empty() {
                format!("live {what} (none)")
            } else {
                format!("live {what}")
            };
            crate::diff::render(
                &doc.live_yaml,
                &doc.new_yaml,
                &live,
                &format!("{source} {what}"),
            )
        })
        .collect()
}

/// The registered services and their instances (what `get services` prints).
pub async fn list_services(target: &Target) -> anyhow::Result<Vec<ServiceInfo>> {
    let mut client = Client::connect(target).await?;
    let request = client.request(ListServicesRequest {});
    Ok(client
        .inner
        .list_services(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner()
        .services)
}

/// `sinewctl get services`.
pub async fn get_services(target: &Target) -> anyhow::Result<()> {
    let mut client = Client::connect(target).await?;
    let request = client.request(ListServicesRequest {});
    let response = client
        .inner
        .list_services(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    if response.services.is_empty() {
        println!("no services (no policy applied and no sidecar registered)");
        return Ok(());
    }
    print!("{}", services_table(&response.services, now_ms()));
    Ok(())
}

/// `sinewctl get policy [NAME]` (kind `None`: every kind), `get service NAME`,
/// `get subscriptions [NAME]`.
pub async fn get_policy(
    target: &Target,
    kind: Option<&str>,
    name: Option<&str>,
) -> anyhow::Result<()> {
    let mut client = Client::connect(target).await?;
    let request = client.request(GetRequest {
        kind: kind.unwrap_or_default().into(),
        name: name.unwrap_or_default().into(),
    });
    let response = client
        .inner
        .get(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    if response.yaml.trim().is_empty() {
        let what = kind.unwrap_or("policy");
        match name {
            Some(name) => bail!("{what} `{name}` has no policy document"),
            None => println!("no {what} documents"),
        }
        return Ok(());
    }
    print!("{}", response.yaml);
    if !response.yaml.ends_with('\n') {
        println!();
    }
    Ok(())
}

/// `sinewctl delete service|subscription NAME`.
pub async fn delete(target: &Target, kind: &str, name: &str) -> anyhow::Result<()> {
    let mut client = Client::connect(target).await?;
    let request = client.request(DeleteRequest {
        kind: kind.into(),
        name: name.into(),
    });
    let response = client
        .inner
        .delete(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    println!("{}/{name} deleted", kind.to_ascii_lowercase());
    println!("version {}", response.version);
    Ok(())
}

/// `sinewctl status`.
pub async fn status(target: &Target) -> anyhow::Result<()> {
    let mut client = Client::connect(target).await?;
    let request = client.request(StatusRequest {});
    let response = client
        .inner
        .status(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    print!("{}", status_header(&response));
    if response.sidecars.is_empty() {
        println!("no sidecars");
        return Ok(());
    }
    print!("{}", status_table(&response.sidecars, now_ms()));
    if let Some(not_after) = response.ca_not_after_unix {
        println!(
            "mesh CA expires {}",
            crate::check::remaining(now_ms() / 1000, not_after)
        );
    }
    Ok(())
}

/// The control plane's own lines of `sinewctl status`: its version (and why it jumped after a
/// restart), and where its policy comes from.
pub fn status_header(response: &sinew_proto::v1::StatusResponse) -> String {
    let mut text = format!("version {}", response.version);
    if response.started_at_version > 0 {
        text.push_str(&format!(
            " (started at {} after a restart: versions are reserved in blocks of 1000, so a \
             restarted control plane continues past the last block and never reuses one)",
            response.started_at_version
        ));
    }
    text.push('\n');
    if response.policy_source.is_empty() {
        text.push_str("policy from sinewctl apply\n");
    } else {
        text.push_str(&format!(
            "policy from {} (edit the files there; apply and delete are refused)\n",
            response.policy_source
        ));
    }
    text.push('\n');
    text
}

/// Which dead letters `sinewctl events ...` touches.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only events of this topic.
    #[arg(long)]
    pub topic: Option<String>,
    /// Only deliveries to this subscribing service.
    #[arg(long)]
    pub service: Option<String>,
    /// Only these event ids (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Replay or purge every dead letter (required when no filter is given).
    #[arg(long)]
    pub all: bool,
}

/// `sinewctl events dead-letters|replay|purge`.
pub async fn dead_letters(
    target: &Target,
    op: events_request::Op,
    filter: DeadLetterFilter,
) -> anyhow::Result<()> {
    let unfiltered = filter.topic.is_none() && filter.service.is_none() && filter.ids.is_empty();
    if op != events_request::Op::List && unfiltered && !filter.all {
        bail!("give --topic, --service or --id, or --all to touch every dead letter");
    }
    let mut client = Client::connect(target).await?;
    let request = client.request(DeadLettersRequest {
        request: Some(EventsRequest {
            op: op as i32,
            topic: filter.topic.unwrap_or_default(),
            service: filter.service.unwrap_or_default(),
            event_ids: filter.ids,
            ..EventsRequest::default()
        }),
    });
    let response = client
        .inner
        .dead_letters(request)
        .await
        .map_err(|s| client.explain(s))?
        .into_inner();
    for failure in &response.failures {
        eprintln!("warning: {failure}");
    }
    match op {
        events_request::Op::List => {
            if response.dead_letters.is_empty() {
                println!("no dead letters");
            } else {
                print!("{}", dead_letters_table(&response.dead_letters, now_ms()));
                if response.matched > response.dead_letters.len() as u64 {
                    eprintln!(
                        "({} of {} shown)",
                        response.dead_letters.len(),
                        response.matched
                    );
                }
            }
        }
        events_request::Op::Replay => println!("{} dead letters replayed", response.matched),
        events_request::Op::Purge => println!("{} dead letters purged", response.matched),
    }
    Ok(())
}

/// EVENT, TOPIC, SUBSCRIBER, SUBSCRIPTION, ATTEMPTS, DEAD SINCE, SIDECAR, LAST ERROR.
pub fn dead_letters_table(entries: &[DeadLetter], now_ms: i64) -> String {
    let mut table = Table::new([
        "EVENT",
        "TOPIC",
        "SUBSCRIBER",
        "SUBSCRIPTION",
        "ATTEMPTS",
        "DEAD SINCE",
        "SIDECAR",
        "LAST ERROR",
    ]);
    for d in entries {
        let attempts = d.attempts.to_string();
        let since = ago(now_ms, d.dead_unix_ms);
        let error = one_line(&d.last_error, 80);
        table.row([
            d.event_id.as_str(),
            d.topic.as_str(),
            d.service.as_str(),
            d.subscription.as_str(),
            attempts.as_str(),
            since.as_str(),
            d.node_id.as_str(),
            error.as_str(),
        ]);
    }
    table.render()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// SERVICE, POLICY, INSTANCES: one row per instance, the service named on its first row.
pub fn services_table(services: &[ServiceInfo], now_ms: i64) -> String {
    let mut table = Table::new(["SERVICE", "POLICY", "INSTANCES"]);
    for service in services {
        let policy = if service.has_policy { "yes" } else { "no" };
        if service.instances.is_empty() {
            table.row([service.name.as_str(), policy, "-"]);
        }
        for (i, instance) in service.instances.iter().enumerate() {
            let (name, policy) = if i == 0 {
                (service.name.as_str(), policy)
            } else {
                ("", "")
            };
            let text = format!(
                "{} ({}) {}",
                instance.addr,
                instance.node_id,
                instance_state(instance, now_ms)
            );
            table.row([name, policy, text.as_str()]);
        }
    }
    table.render()
}

fn instance_state(instance: &InstanceInfo, now_ms: i64) -> String {
    match (instance.connected, instance.serving) {
        (true, true) => "ready".into(),
        (true, false) => "not serving".into(),
        (false, _) if instance.lease_expires_unix_ms > now_ms => {
            let left =
                Duration::from_millis((instance.lease_expires_unix_ms - now_ms).unsigned_abs());
            format!("disconnected, lease ends in {}s", left.as_secs().max(1))
        }
        (false, _) => "disconnected".into(),
    }
}

/// SIDECAR, SERVICE, INSTANCE, CONNECTED SINCE, VERSION (applied/sent), STATE, CERT EXPIRES,
/// LAST ERROR.
pub fn status_table(sidecars: &[SidecarStatus], now_ms: i64) -> String {
    let mut table = Table::new([
        "SIDECAR",
        "SERVICE",
        "INSTANCE",
        "CONNECTED SINCE",
        "VERSION",
        "STATE",
        "CERT EXPIRES",
        "LAST ERROR",
    ]);
    for s in sidecars {
        let since = if s.connected {
            ago(now_ms, s.connected_since_unix_ms)
        } else {
            "disconnected".into()
        };
        let version = format!("{}/{}", s.applied_version, s.sent_version);
        let error = if s.last_nack_error.is_empty() {
            "-".to_string()
        } else {
            one_line(
                &format!("v{}: {}", s.last_nack_version, s.last_nack_error),
                80,
            )
        };
        let state = if s.state.is_empty() {
            "-"
        } else {
            s.state.as_str()
        };
        let expires = s.certificate_not_after_unix.map_or("-".to_string(), |t| {
            crate::check::remaining(now_ms / 1000, t)
        });
        table.row([
            s.node_id.as_str(),
            s.service.as_str(),
            s.instance_addr.as_str(),
            since.as_str(),
            version.as_str(),
            state,
            expires.as_str(),
            error.as_str(),
        ]);
    }
    table.render()
}

/// The first line of `text`, cut to `max` characters with `…`.
fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max && line.len() == text.trim_end().len() {
        return line.to_string();
    }
    let cut: String = line.chars().take(max.saturating_sub(1)).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A control plane that knows one token, refuses documents that say `bad`, and has one
    /// sidecar.
    struct FakeControl;

    fn check(metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        match metadata.get("authorization").and_then(|v| v.to_str().ok()) {
            Some("Bearer secret") => Ok(()),
            _ => Err(Status::unauthenticated("invalid admin token")),
        }
    }

    #[tonic::async_trait]
    impl sinew_proto::v1::admin_api_server::AdminApi for FakeControl {
        async fn apply(
            &self,
            request: Request<ApplyRequest>,
        ) -> Result<tonic::Response<sinew_proto::v1::ApplyResponse>, Status> {
            check(request.metadata())?;
            if request.get_ref().yaml.contains("bad") {
                return Err(Status::invalid_argument(
                    "document 1 (Service a): spec.timeout: `2` needs a unit (ms, s, m or h)",
                ));
            }
            Ok(tonic::Response::new(sinew_proto::v1::ApplyResponse {
                documents: vec![sinew_proto::v1::AppliedDocument {
                    kind: "Service".into(),
                    name: "a".into(),
                    outcome: "created".into(),
                    ..Default::default()
                }],
                version: 3,
                ..Default::default()
            }))
        }
        async fn get(
            &self,
            request: Request<GetRequest>,
        ) -> Result<tonic::Response<sinew_proto::v1::GetResponse>, Status> {
            check(request.metadata())?;
            Err(Status::not_found(format!(
                "Service `{}` not found",
                request.get_ref().name
            )))
        }
        async fn delete(
            &self,
            request: Request<DeleteRequest>,
        ) -> Result<tonic::Response<sinew_proto::v1::DeleteResponse>, Status> {
            check(request.metadata())?;
            Ok(tonic::Response::new(sinew_proto::v1::DeleteResponse {
                version: 4,
            }))
        }
        async fn list_services(
            &self,
            request: Request<ListServicesRequest>,
        ) -> Result<tonic::Response<sinew_proto::v1::ListServicesResponse>, Status> {
            check(request.metadata())?;
            Ok(tonic::Response::new(Default::default()))
        }
        async fn dead_letters(
            &self,
            request: Request<sinew_proto::v1::DeadLettersRequest>,
        ) -> Result<tonic::Response<sinew_proto::v1::DeadLettersResponse>, Status> {
            check(request.metadata())?;
            Ok(tonic::Response::new(Default::default()))
        }
        async fn status(
            &self,
            request: Request<StatusRequest>,
        ) -> Result<tonic::Response<sinew_proto::v1::StatusResponse>, Status> {
            check(request.metadata())?;
            Ok(tonic::Response::new(sinew_proto::v1::StatusResponse {
                version: 4,
                sidecars: vec![SidecarStatus {
                    node_id: "a-1".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }))
        }
    }

    #[tokio::test]
    async fn calls_carry_the_token_and_errors_read_well() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(sinew_proto::v1::admin_api_server::AdminApiServer::new(
                    FakeControl,
                ))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let dir = std::env::temp_dir().join(format!("sinewctl-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, wrong, docs, bad) = (
            dir.join("good"),
            dir.join("wrong"),
            dir.join("ok.yaml"),
            dir.join("bad.yaml"),
        );
        std::fs::write(&good, "secret\n").unwrap();
        std::fs::write(&wrong, "guess\n").unwrap();
        std::fs::write(&docs, "kind: Service\nname: a\n").unwrap();
        std::fs::write(&bad, "bad").unwrap();
        let target = |token: &Path| Target {
            addr: addr.clone(),
            token_file: token.to_path_buf(),
        };

        apply(&target(&good), &docs, ApplyMode::default())
            .await
            .unwrap();
        status(&target(&good)).await.unwrap();
        get_services(&target(&good)).await.unwrap();
        delete(&target(&good), "Service", "a").await.unwrap();
        let e = apply(&target(&good), &bad, ApplyMode::default())
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "document 1 (Service a): spec.timeout: `2` needs a unit (ms, s, m or h)"
        );
        let e = get_policy(&target(&good), Some("Service"), Some("zz"))
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(e, "Service `zz` not found");
        let e = status(&target(&wrong)).await.unwrap_err().to_string();
        assert!(
            e.contains("refused the admin token from") && e.contains("invalid admin token"),
            "{e}"
        );
        let e = status(&target(&dir.join("missing"))).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot read the admin token"),
            "{e:#}"
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let unreachable = Target {
            addr: closed.to_string(),
            token_file: good.clone(),
        };
        let e = status(&unreachable).await.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("cannot reach the control plane at {closed}")),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn status_header_explains_the_version_jump_and_the_policy_source() {
        let fresh = sinew_proto::v1::StatusResponse {
            version: 8,
            ..Default::default()
        };
        assert_eq!(
            status_header(&fresh),
            "version 8\npolicy from sinewctl apply\n\n"
        );
        let restarted = sinew_proto::v1::StatusResponse {
            version: 1003,
            started_at_version: 1001,
            policy_source: ".sinew/policy.yaml".into(),
            ..Default::default()
        };
        assert_eq!(
            status_header(&restarted),
            "version 1003 (started at 1001 after a restart: versions are reserved in blocks of \
             1000, so a restarted control plane continues past the last block and never reuses one)\n\
             policy from .sinew/policy.yaml (edit the files there; apply and delete are refused)\n\n"
        );
    }

    #[test]
    fn status_table_shows_versions_state_and_errors() {
        let now = 1_000_000_000;
        let sidecars = vec![
            SidecarStatus {
                node_id: "web-1".into(),
                service: "web".into(),
                instance_addr: "127.0.0.1:40001".into(),
                connected: true,
                connected_since_unix_ms: now - 133_000,
                sent_version: 4,
                applied_version: 4,
                state: "ACK".into(),
                certificate_not_after_unix: Some(now / 1000 + 3600),
                ..Default::default()
            },
            SidecarStatus {
                node_id: "orders-1".into(),
                service: "orders".into(),
                instance_addr: "127.0.0.1:40002".into(),
                connected: false,
                sent_version: 4,
                applied_version: 3,
                state: "NACK".into(),
                last_nack_error: "spec.timeout: unknown\nmore".into(),
                last_nack_version: 4,
                ..Default::default()
            },
        ];
        let text = status_table(&sidecars, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "SIDECAR    SERVICE   INSTANCE          CONNECTED SINCE   VERSION   STATE   CERT EXPIRES   LAST ERROR"
        );
        assert_eq!(
            lines[1],
            "web-1      web       127.0.0.1:40001   2m13s ago         4/4       ACK     in 1h0m        -"
        );
        assert_eq!(
            lines[2],
            "orders-1   orders    127.0.0.1:40002   disconnected      3/4       NACK    -              v4: spec.timeout: unknown…"
        );
    }

    #[test]
    fn services_table_lists_instances_under_their_service() {
        let now = 50_000;
        let instance = |node: &str, connected, serving, lease| InstanceInfo {
            node_id: node.into(),
            addr: format!("127.0.0.1:{}", 4000 + node.len()),
            connected,
            serving,
            lease_expires_unix_ms: lease,
            ..Default::default()
        };
        let services = vec![
            ServiceInfo {
                name: "orders".into(),
                has_policy: true,
                instances: vec![
                    instance("orders-1", true, true, 0),
                    instance("orders-22", false, true, now + 7_500),
                ],
            },
            ServiceInfo {
                name: "web".into(),
                has_policy: false,
                instances: vec![],
            },
        ];
        let text = services_table(&services, now);
        assert_eq!(
            text,
            "SERVICE   POLICY   INSTANCES\n\
             orders    yes      127.0.0.1:4008 (orders-1) ready\n\
             \x20                  127.0.0.1:4009 (orders-22) disconnected, lease ends in 7s\n\
             web       no       -\n"
        );
    }
}
