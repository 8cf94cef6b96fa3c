//! The HTTP JSON API served by every agent, and the consensus RPC endpoints.
//!
//! Reads answer from this host's applied state and liveness view; writes become consensus
//! commands, forwarded to the leader when this host is not the leader. Agent-to-agent endpoints
//! (`/raft/*`, `/v1/internal/*`) require the bearer token derived from the cluster secret.

use crate::agent::{Agent, AgentError};
mod cluster;
mod events;
mod failovers;
mod hosts;
mod internal;
mod join;
mod migrations;
mod rebalance;
mod tokens;
mod vms;

use crate::api_limits::{CappedListener, MAX_CONNECTIONS};
use crate::consensus::{ConsensusError, TypeConfig};
use crate::endpoints::{self, Access};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cluster::*;
use events::*;
use failovers::*;
use hosts::*;
use internal::*;
use join::{host_join, join_proof};
use migrations::*;
use rebalance::rebalance;
use tokens::*;
use vms::*;

use crate::views::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::liveness::HostLiveness;
use tandem_core::state::{token_sha256, ApiToken, Applied, Command, PowerState, Role, Rule, Settings, StateError, VmSpec};
use tandem_core::HostId;

/// The largest request body accepted (consensus snapshots arrive in chunks below this).
pub const MAX_BODY: usize = 16 << 20;

/// An error answer: status and a message in `{"error": …}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl std::fmt::Display) -> ApiError {
        ApiError { status, message: message.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.message })).into_response()
    }
}

/// An error and its sources, joined by ": ".
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        let status = match e {
            AgentError::NoLeader | AgentError::Forward(_) | AgentError::LeaderChanged => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, chain(&e))
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> ApiError {
        let status = match e {
            StateError::UnknownVm(_) | StateError::UnknownHost(_) | StateError::UnknownRule(_) | StateError::UnknownToken(_) => StatusCode::NOT_FOUND,
            StateError::InvalidSpec(_)
            | StateError::BadHostName(_)
            | StateError::BadSite(_)
            | StateError::BadHostId(_)
            | StateError::BadSetting(_)
            | StateError::BadToken(_) => StatusCode::BAD_REQUEST,
            // Refused by the cluster as it stands: a conflict the caller can resolve. Listed
            // one by one, so that a new refusal is given its status deliberately.
            StateError::HostExists(_)
            | StateError::VmExists(_)
            | StateError::VmNotStopped(_)
            | StateError::NotPlaceable(_)
            | StateError::HostNotActive(_)
            | StateError::NoCapacity { .. }
            | StateError::HostMode { .. }
            | StateError::BreaksHardRule { .. }
            | StateError::Stale(_)
            | StateError::Admission(_)
            | StateError::RuleInfeasible { .. }
            | StateError::RuleConflict { .. }
            | StateError::TokenExists(_)
            | StateError::VmInError { .. }
            | StateError::NotMigratable { .. }
            | StateError::NotMigrating { .. }
            | StateError::MigrationLimit(_)
            | StateError::NotMirrored(_)
            | StateError::StaleCopy { .. } => StatusCode::CONFLICT,
            // A log entry the proposer built wrong: a bug, not the caller's doing.
            StateError::Unjudged(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e)
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Parses a request or answer body. Every body of this API is a JSON object: serde would also
/// read a struct from an array of its fields (`[null, null]`), which no client means.
fn parse<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let v = parse_object(body, what)?;
    serde_json::from_value(v).map_err(|e| malformed(what, &e))
}

fn malformed(what: &str, e: &dyn std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, format!("malformed {what}: {e}"))
}

/// The body as a JSON object.
fn parse_object(body: &[u8], what: &str) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| malformed(what, &e))?;
    if !v.is_object() {
        return Err(malformed(what, &"expected a JSON object"));
    }
    Ok(v)
}

/// [`parse`] for what an API caller sends: a field the type does not know is refused, by name.
/// (The types that travel in log entries accept unknown fields, so that an older host does not
/// refuse a newer entry; the caller's typo must not pass silently all the same.)
fn parse_strict<T: for<'de> Deserialize<'de> + Serialize>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let input = parse_object(body, what)?;
    let parsed: T = serde_json::from_value(input.clone()).map_err(|e| malformed(what, &e))?;
    let known = serde_json::to_value(&parsed).unwrap_or(Value::Null);
    match unknown_field(&input, &known, "") {
        Some(field) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("malformed {what}: unknown field `{field}`"))),
        None => Ok(parsed),
    }
}

/// The first field of `input` (as a dotted path) that `known`, the parsed value written back,
/// does not have. A `null` counts as absent (an unset optional field is not written back).
fn unknown_field(input: &Value, known: &Value, at: &str) -> Option<String> {
    match (input, known) {
        (Value::Object(i), Value::Object(k)) => i.iter().find_map(|(key, v)| {
            let path = if at.is_empty() { key.clone() } else { format!("{at}.{key}") };
            match k.get(key) {
                Some(kv) => unknown_field(v, kv, &path),
                None if v.is_null() => None,
                None => Some(path),
            }
        }),
        (Value::Array(i), Value::Array(k)) => i.iter().zip(k).enumerate().find_map(|(n, (v, kv))| unknown_field(v, kv, &format!("{at}[{n}]"))),
        _ => None,
    }
}

/// A query string, refused with the API's JSON error body (axum's own rejection is plain text).
struct ApiQuery<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed query string: {}", e.body_text())))
    }
}

/// A name in the path, refused with the API's JSON error body: a name that does not decode (not
/// UTF-8) names nothing, so it is a 404 like any unknown name (axum's own rejection is a plain
/// text 400, which the API document does not list).
struct ApiPath(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ApiPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(name)| ApiPath(name))
            .map_err(|e| ApiError::new(StatusCode::NOT_FOUND, format!("no such name: {}", e.body_text())))
    }
}

fn authorized(agent: &Agent, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = format!("Bearer {}", agent.token);
    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(v) if same(v.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong cluster token")),
    }
}

tokio::task_local! {
    /// Who authorized the request being handled.
    static CALLER: Caller;
}

/// What an API change did, for the timeline: the command's kind and what it names.
fn describe(cmd: &Command) -> String {
    let forced = if cmd.forced() { " (forced)" } else { "" };
    match cmd.subject() {
        Some(s) => format!("{} {s}{forced}", cmd.op()),
        None => format!("{}{forced}", cmd.op()),
    }
}

/// Proposes a change an API caller asked for, and records it in the timeline with the name of
/// the token that made it (whether it was applied or refused).
async fn submit(agent: &Agent, cmd: Command) -> Result<Applied, ApiError> {
    let what = describe(&cmd);
    let who = CALLER.try_with(|c| c.name.clone()).unwrap_or_else(|_| "internal".into());
    let result = agent.submit(cmd).await;
    let outcome = match &result {
        Ok(Ok(_)) => "applied".to_string(),
        Ok(Err(e)) => format!("refused: {e}"),
        Err(e) => format!("not committed: {e}"),
    };
    agent.events.record(crate::events::EventKind::ApiChange, None, None, format!("{what} by token '{who}': {outcome}"));
    Ok(result??)
}

/// Who is calling, as the bearer token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// Equal-time comparison, so the cluster token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn caller(agent: &Agent, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "authentication required: send 'Authorization: Bearer TOKEN'"));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "malformed Authorization header: expected 'Bearer TOKEN'"))?;
    if same(token.as_bytes(), agent.token.as_bytes()) {
        return Ok(Caller { name: "cluster".into(), role: Role::Admin });
    }
    agent
        .consensus
        .with_state(|s| s.token_role(token).map(|(name, role)| Caller { name: name.to_string(), role }))
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "unknown or revoked token"))
}

/// Checks every routed request against the endpoint table: unlisted routes are refused, and
/// the caller's token must allow the endpoint's access level.
async fn authorize(State(a): State<Arc<Agent>>, route: MatchedPath, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_string();
    let Some(endpoint) = endpoints::find(&method, route.as_str()) else {
        let allow = endpoints::methods(route.as_str()).join(", ");
        let mut refusal = ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} answers {allow}, not {method}", route.as_str())).into_response();
        if let Ok(v) = axum::http::HeaderValue::from_str(&allow) {
            refusal.headers_mut().insert(axum::http::header::ALLOW, v);
        }
        return refusal;
    };
    let refuse =
        |c: &Caller, needs: &str| ApiError::new(StatusCode::FORBIDDEN, format!("token '{}' is {}: {method} {} needs {needs}", c.name, c.role, route.as_str()));
    let allowed = match endpoint.access {
        Access::Public => Ok(Caller { name: "anonymous".into(), role: Role::ReadOnly }),
        Access::Cluster => authorized(&a, req.headers()).map(|()| Caller { name: "cluster".into(), role: Role::Admin }),
        Access::Read => caller(&a, req.headers()),
        Access::Operate => caller(&a, req.headers()).and_then(|c| match c.role {
            Role::Admin | Role::Operator => Ok(c),
            Role::ReadOnly => Err(refuse(&c, "an operator or admin token")),
        }),
        Access::Admin => caller(&a, req.headers()).and_then(|c| match c.role {
            Role::Admin => Ok(c),
            Role::Operator | Role::ReadOnly => Err(refuse(&c, "an admin token")),
        }),
    };
    match allowed {
        Ok(c) => CALLER.scope(c, next.run(req)).await,
        Err(e) => e.into_response(),
    }
}

/// Builds the router.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(crate::metrics::serve))
        .route("/v1/tokens", get(tokens).post(token_create))
        .route("/v1/tokens/{name}", axum::routing::delete(token_delete))
        .route("/v1/status", get(status))
        .route("/v1/identity", get(identity))
        .route("/v1/join-proof", get(join_proof))
        .route("/v1/cluster/init", post(cluster_init))
        .route("/v1/hosts", get(hosts))
        .route("/v1/hosts/join", post(host_join))
        .route("/v1/vms", get(vms).post(vm_create))
        .route("/v1/vms/{name}", get(vm_show).delete(vm_delete).put(vm_update))
        .route("/v1/vms/{name}/start", post(vm_start))
        .route("/v1/vms/{name}/clear", post(vm_clear))
        .route("/v1/hosts/{name}/mode", post(host_mode))
        .route("/v1/hosts/{name}/evacuation", get(host_evacuation))
        .route("/v1/hosts/{name}/shutdown", post(host_shutdown))
        .route("/v1/ftt", get(ftt))
        .route("/v1/plan", get(plan))
        .route("/v1/rebalance", get(rebalance))
        .route("/v1/settings", get(settings_show).post(settings_set))
        .route("/v1/rules", get(rules).post(rule_set))
        .route("/v1/rules/{name}", axum::routing::delete(rule_delete))
        .route("/v1/vms/{name}/stop", post(vm_stop))
        .route("/v1/vms/{name}/migrate", post(vm_migrate).delete(vm_migrate_cancel))
        .route("/v1/migrations", get(migrations))
        .route("/v1/internal/incoming", post(internal_incoming))
        .route("/v1/internal/copies", post(internal_copies))
        .route("/v1/local", get(local))
        .route("/v1/events", get(events))
        .route("/v1/failovers", get(failovers))
        .route("/v1/internal/propose", post(internal_propose))
        .route("/raft/append", post(raft_append))
        .route("/raft/vote", post(raft_vote))
        .route("/raft/snapshot", post(raft_snapshot))
        .route("/raft/witness/append", post(witness_append))
        .route("/raft/witness/vote", post(witness_vote))
        .route("/raft/witness/snapshot", post(witness_snapshot))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&agent), authorize))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(crate::api_limits::deadline))
        .with_state(agent)
}

async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

async fn openapi() -> Json<Value> {
    Json(endpoints::openapi())
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(agent: Arc<Agent>, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), AgentError> {
    let addr = agent.cfg.api_addr;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| AgentError::Bind { what: "API", addr, source })?;
    let bind = |source| AgentError::Bind { what: "API", addr, source };
    match agent.cfg.tls.clone() {
        Some(t) => {
            let tls = crate::tls::ServerTls::load(&t.cert, &t.key)?;
            let listener = crate::tls::TlsListener::spawn(listener, tls).map_err(bind)?;
            let listener = CappedListener::new(listener, MAX_CONNECTIONS);
            axum::serve(listener, router(agent)).with_graceful_shutdown(shutdown).await.map_err(bind)
        }
        None => {
            let listener = CappedListener::new(listener, MAX_CONNECTIONS);
            axum::serve(listener, router(agent)).with_graceful_shutdown(shutdown).await.map_err(bind)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API refuses a field it does not know anywhere in a body, by its path, although the
    /// types themselves (which travel in log entries) accept unknown fields; an unset optional
    /// field sent as null is fine.
    #[test]
    fn api_input_refuses_unknown_fields_by_name() {
        let spec = |extra: &str, driver_extra: &str| {
            format!("{{\"name\":\"a\",\"vcpus\":1,\"memory_mib\":64,\"network\":null{extra},\"driver\":{{\"kind\":\"process\",\"command\":[\"true\"]{driver_extra}}}}}")
        };
        assert!(parse_strict::<VmSpec>(spec("", "").as_bytes(), "VM spec").is_ok());
        let top = parse_strict::<VmSpec>(spec(",\"memory\":64", "").as_bytes(), "VM spec").err().map(|e| e.message);
        assert!(top.as_deref().is_some_and(|m| m.contains("unknown field `memory`")), "{top:?}");
        let nested = parse_strict::<VmSpec>(spec("", ",\"cmd\":1").as_bytes(), "VM spec").err().map(|e| e.message);
        assert!(nested.as_deref().is_some_and(|m| m.contains("unknown field `driver.cmd`")), "{nested:?}");
        assert!(parse::<VmSpec>(spec(",\"memory\":64", "").as_bytes(), "VM spec").is_ok(), "the type itself is lenient");
        let update = format!("{{\"spec\":{},\"force\":false}}", spec("", ",\"x\":true"));
        assert!(parse_strict::<UpdateVmRequest>(update.as_bytes(), "VM update").is_err());
    }
}
