//! `AdminApi`: what `sinewctl` calls, behind a bearer token.
//!
//! Policy comes in as a YAML stream and is validated completely before anything changes; a
//! refusal's message is the [`PolicyError`](sinew_proto::policy::PolicyError) text, which
//! names the document, the field path and the reason, so `sinewctl apply` can print it as is.
//! A control plane started with `--policy` answers `Apply` and `Delete` with
//! `FAILED_PRECONDITION` naming the files: one source of truth (see `policies`).

use crate::mesh::{ApplyOptions, Mesh, MeshError};
use crate::metrics as m;
use crate::session::Streams;
use crate::tokens::constant_time_eq;
use sinew_proto::policy::{Document, Kind, parse_documents};
use sinew_proto::v1::admin_api_server::AdminApi;
use sinew_proto::v1::events_request;
use sinew_proto::v1::{
    AppliedDocument, ApplyRequest, ApplyResponse, DeadLettersRequest, DeadLettersResponse,
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, ListServicesRequest,
    ListServicesResponse, StatusRequest, StatusResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AdminApiService {
    pub mesh: Arc<Mesh>,
    /// The sidecars' streams: dead letters live in the sidecars' outboxes, so the admin API
    /// asks them.
    pub streams: Arc<Streams>,
    /// The mesh CA's (not_before, not_after), unix seconds, for `sinewctl status` and `check`.
    pub ca_validity: (i64, i64),
}

/// How long `DeadLetters` waits for the sidecars' answers.
const ASK_SIDECARS: std::time::Duration = std::time::Duration::from_secs(5);

/// The interceptor that guards every admin call: `authorization: Bearer <admin token>`.
#[derive(Clone)]
pub struct RequireToken {
    token: Arc<str>,
}

impl RequireToken {
    pub fn new(token: &str) -> Self {
        RequireToken {
            token: Arc::from(token),
        }
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match presented {
            Some(token) if constant_time_eq(token.as_bytes(), self.token.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("invalid admin token")),
            None => Err(Status::unauthenticated(
                "missing `authorization: Bearer <admin token>` (see <data-dir>/admin-token)",
            )),
        }
    }
}

fn refused(e: MeshError) -> Status {
    match e {
        MeshError::Store(_) => {
            tracing::error!("{e}");
            Status::internal(e.to_string())
        }
        MeshError::PolicyFromFiles(_) | MeshError::Dangling(_) => {
            Status::failed_precondition(e.to_string())
        }
    }
}

/// A kind as a command names it: like a Kubernetes resource name, any case, singular or
/// plural (`service`, `Services`). The `kind:` of a document is stricter ([`Kind::parse`]).
/// Empty: every kind.
fn kind_selector(text: &str) -> Result<Option<Kind>, Status> {
    if text.is_empty() {
        return Ok(None);
    }
    let lower = text.to_ascii_lowercase();
    let singular = lower.strip_suffix('s').unwrap_or(&lower);
    Kind::ALL
        .into_iter()
        .find(|k| k.to_string().to_ascii_lowercase() == singular)
        .map(Some)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "unknown kind `{text}` (known: Service, Subscription)"
            ))
        })
}

/// Documents as a YAML stream, the way `sinewctl get` prints them.
pub fn yaml_stream(docs: &[Document]) -> String {
    docs.iter()
        .map(Document::to_yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}

#[tonic::async_trait]
impl AdminApi for AdminApiService {
    async fn dead_letters(
        &self,
        request: Request<DeadLettersRequest>,
    ) -> Result<Response<DeadLettersResponse>, Status> {
        let question = request
            .into_inner()
            .request
            .ok_or_else(|| Status::invalid_argument("DeadLettersRequest.request is missing"))?;
        let (answers, mut failures) = self.streams.ask_all(&question, ASK_SIDECARS).await;
        let mut response = DeadLettersResponse::default();
        let listing = question.op == events_request::Op::List as i32;
        let mut stores = std::collections::HashSet::new();
        for (node, reply) in answers {
            if !reply.error.is_empty() {
                failures.push(format!("{node}: {}", reply.error));
                continue;
            }
            // A shared store (NATS) lists the same dead letters through every sidecar; a
            // replay or purge through several of them settles each dead letter once.
            if listing && !reply.store.is_empty() && !stores.insert(reply.store.clone()) {
                continue;
            }
            response.matched += reply.matched;
            let holder = if reply.store.is_empty() {
                node.clone()
            } else {
                reply.store.clone()
            };
            response
                .dead_letters
                .extend(reply.dead_letters.into_iter().map(|mut d| {
                    d.node_id = holder.clone();
                    d
                }));
        }
        response
            .dead_letters
            .sort_by(|a, b| (a.dead_unix_ms, &a.event_id).cmp(&(b.dead_unix_ms, &b.event_id)));
        failures.sort();
        response.failures = failures;
        Ok(Response::new(response))
    }

    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let request = request.into_inner();
        let docs = match parse_documents(&request.yaml) {
            Ok(docs) => docs,
            Err(e) => {
                m::policy_apply("invalid");
                return Err(Status::invalid_argument(e.to_string()));
            }
        };
        let options = ApplyOptions {
            strict: request.strict,
            dry_run: request.dry_run,
        };
        let applied = self.mesh.apply(docs, options).map_err(|e| {
            m::policy_apply(match e {
                MeshError::Store(_) => "error",
                _ => "refused",
            });
            refused(e)
        })?;
        if !options.dry_run {
            m::policy_apply("ok");
            for (kind, name, outcome) in &applied.outcomes {
                let version = applied.version;
                tracing::info!(%kind, %name, outcome = outcome.as_str(), version, "policy applied");
            }
            for warning in &applied.warnings {
                tracing::warn!("applied with a warning: {warning}");
            }
        }
        let mut diffs = applied.diffs.into_iter();
        Ok(Response::new(ApplyResponse {
            documents: applied
                .outcomes
                .into_iter()
                .map(|(kind, name, outcome)| {
                    let (live_yaml, new_yaml) = diffs.next().unwrap_or_default();
                    AppliedDocument {
                        kind: kind.to_string(),
                        name,
                        outcome: outcome.as_str().to_string(),
                        live_yaml: live_yaml.unwrap_or_default(),
                        new_yaml,
                    }
                })
                .collect(),
            version: applied.version,
            warnings: applied.warnings,
            policy_source: self
                .mesh
                .policy_source()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let request = request.into_inner();
        let kind = kind_selector(&request.kind)?;
        let name = (!request.name.is_empty()).then_some(request.name.as_str());
        let docs = self.mesh.documents(kind, name);
        if let (Some(name), true) = (name, docs.is_empty()) {
            return Err(Status::not_found(match kind {
                Some(kind) => format!("{kind} `{name}` not found"),
                None => format!("no policy document named `{name}`"),
            }));
        }
        Ok(Response::new(GetResponse {
            yaml: yaml_stream(&docs),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let request = request.into_inner();
        let kind = kind_selector(&request.kind)?
            .ok_or_else(|| Status::invalid_argument("DeleteRequest.kind is empty"))?;
        match self.mesh.delete(kind, &request.name).map_err(refused)? {
            Some(version) => {
                tracing::info!(%kind, name = %request.name, version, "policy deleted");
                Ok(Response::new(DeleteResponse { version }))
            }
            None => Err(Status::not_found(format!(
                "{kind} `{}` not found",
                request.name
            ))),
        }
    }

    async fn list_services(
        &self,
        _request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Ok(Response::new(ListServicesResponse {
            services: self.mesh.list_services(),
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let mut status = self.mesh.status();
        status.ca_not_before_unix = Some(self.ca_validity.0);
        status.ca_not_after_unix = Some(self.ca_validity.1);
        Ok(Response::new(status))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn call(token: Option<&str>) -> Result<Request<()>, Status> {
        let mut request = Request::new(());
        if let Some(value) = token {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        RequireToken::new("s3cret").call(request)
    }

    #[test]
    fn the_token_is_required() {
        assert!(call(Some("Bearer s3cret")).is_ok());
        assert_eq!(
            call(Some("Bearer nope")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            call(Some("s3cret")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(call(None).unwrap_err().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn kinds_as_commands_name_them() {
        assert_eq!(kind_selector("").unwrap(), None);
        assert_eq!(kind_selector("service").unwrap(), Some(Kind::Service));
        assert_eq!(
            kind_selector("Subscriptions").unwrap(),
            Some(Kind::Subscription)
        );
        let e = kind_selector("Route").unwrap_err();
        assert_eq!(
            e.message(),
            "unknown kind `Route` (known: Service, Subscription)"
        );
    }

    #[test]
    fn yaml_stream_joins_documents() {
        let docs =
            parse_documents("kind: Service\nname: a\n---\nkind: Service\nname: b\n").unwrap();
        let text = yaml_stream(&docs);
        assert_eq!(text.matches("---\n").count(), 1);
        assert_eq!(parse_documents(&text).unwrap(), docs);
    }
}
