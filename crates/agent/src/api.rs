//! The HTTP JSON API served by every agent, and the consensus RPC endpoints.
//!
//! Reads answer from this host's applied state and liveness view; writes become consensus
//! commands, forwarded to the leader when this host is not the leader. Agent-to-agent endpoints
//! (`/raft/*`, `/v1/internal/*`) require the bearer token derived from the cluster secret.

use crate::agent::{Agent, AgentError};
mod join;

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
use join::{host_join, join_proof};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::liveness::HostLiveness;
use tandem_core::state::{token_sha256, ApiToken, Applied, Capacity, Command, HostMode, PowerState, Role, Rule, Settings, StateError, VmSpec};
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
        (self.status, Json(json!({ "error": self.message }))).into_response()
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
            AgentError::NoLeader | AgentError::Forward(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, chain(&e))
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> ApiError {
        let status = match e {
            StateError::UnknownVm(_) | StateError::UnknownHost(_) | StateError::UnknownRule(_) | StateError::UnknownToken(_) => StatusCode::NOT_FOUND,
            StateError::InvalidSpec(_) | StateError::BadHostName(_) | StateError::BadHostId(_) | StateError::BadSetting(_) | StateError::BadToken(_) => {
                StatusCode::BAD_REQUEST
            }
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
            | StateError::VmInError { .. } => StatusCode::CONFLICT,
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
    let bad = |e: String| ApiError::new(StatusCode::BAD_REQUEST, format!("malformed {what}: {e}"));
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    if !v.is_object() {
        return Err(bad("expected a JSON object".into()));
    }
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}

/// [`parse`] for what an API caller sends: a field the type does not know is refused, by name.
/// (The types that travel in log entries accept unknown fields, so that an older host does not
/// refuse a newer entry; the caller's typo must not pass silently all the same.)
fn parse_strict<T: for<'de> Deserialize<'de> + Serialize>(body: &[u8], what: &str) -> Result<T, ApiError> {
    let parsed: T = parse(body, what)?;
    let input: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
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
    let v = serde_json::to_value(cmd).unwrap_or(Value::Null);
    let op = v["op"].as_str().unwrap_or("change").to_string();
    let subject = ["name", "host"]
        .iter()
        .find_map(|k| v[*k].as_str().map(str::to_string).or_else(|| v[*k].as_u64().map(|h| format!("host {h}"))))
        .or_else(|| v["spec"]["name"].as_str().map(str::to_string))
        .or_else(|| v["rule"]["name"].as_str().map(str::to_string))
        .or_else(|| v["token"]["name"].as_str().map(str::to_string));
    let forced = if v["force"] == Value::Bool(true) { " (forced)" } else { "" };
    match subject {
        Some(s) => format!("{op} {s}{forced}"),
        None => format!("{op}{forced}"),
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
        .route("/v1/ftt", get(ftt))
        .route("/v1/plan", get(plan))
        .route("/v1/settings", get(settings_show).post(settings_set))
        .route("/v1/rules", get(rules).post(rule_set))
        .route("/v1/rules/{name}", axum::routing::delete(rule_delete))
        .route("/v1/vms/{name}/stop", post(vm_stop))
        .route("/v1/local", get(local))
        .route("/v1/events", get(events))
        .route("/v1/internal/propose", post(internal_propose))
        .route("/raft/append", post(raft_append))
        .route("/raft/vote", post(raft_vote))
        .route("/raft/snapshot", post(raft_snapshot))
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

async fn tokens(State(a): State<Arc<Agent>>) -> Json<Value> {
    Json(a.consensus.with_state(|s| json!(s.tokens.values().map(|t| json!({ "name": t.name, "role": t.role })).collect::<Vec<_>>())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    role: Role,
}

async fn token_create(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<Value> {
    let b: TokenBody = parse(&body, "token request")?;
    // 32 random bytes from the kernel: the token is shown once and only its hash is replicated.
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading /dev/urandom: {e}")))?;
    let token: String = std::iter::once("tdm_".to_string()).chain(raw.iter().map(|b| format!("{b:02x}"))).collect();
    let record = ApiToken { name: b.name.clone(), role: b.role, sha256: token_sha256(&token) };
    submit(&a, Command::SetToken { token: record }).await?;
    a.events.record(crate::events::EventKind::TokenCreated, None, None, format!("API token '{}' ({}) created", b.name, b.role));
    Ok(Json(json!({ "name": b.name, "role": b.role, "token": token })))
}

async fn token_delete(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Value> {
    submit(&a, Command::DeleteToken { name: name.clone() }).await?;
    a.events.record(crate::events::EventKind::TokenRevoked, None, None, format!("API token '{name}' revoked"));
    Ok(Json(json!({ "revoked": name })))
}

async fn status(State(a): State<Arc<Agent>>) -> Json<Value> {
    Json(json!({
        "host": a.cfg.name,
        "host_id": a.me.0,
        "incarnation": a.incarnation,
        "driver": a.driver.kind(),
        "runtime": a.status(),
        "consensus": a.consensus.status(),
        "rejected": a.reject_counters(),
    }))
}

/// What a host tells a cluster that adds it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub host_id: u32,
    pub name: String,
    pub api_addr: String,
    pub heartbeat_addr: String,
    pub capacity: Capacity,
}

async fn identity(State(a): State<Arc<Agent>>) -> Json<Identity> {
    Json(Identity {
        host_id: a.me.0,
        name: a.cfg.name.clone(),
        api_addr: a.cfg.api_addr.to_string(),
        heartbeat_addr: a.cfg.heartbeat_addr.to_string(),
        capacity: a.cfg.capacity(),
    })
}

async fn cluster_init(State(a): State<Arc<Agent>>) -> ApiResult<Value> {
    a.consensus.initialize(&a.cfg.api_addr.to_string()).await.map_err(|e| match e {
        ConsensusError::AlreadyInitialized => ApiError::new(StatusCode::CONFLICT, "this host already belongs to a cluster"),
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, chain(&other)),
    })?;
    // The new single-host cluster elects itself; wait for that before the first command.
    for _ in 0..100 {
        if a.consensus.is_leader() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let id = identity(State(Arc::clone(&a))).await.0;
    submit(
        &a,
        Command::AddHost { id: HostId(id.host_id), name: id.name.clone(), api_addr: id.api_addr, heartbeat_addr: id.heartbeat_addr, capacity: id.capacity },
    )
    .await?;
    a.events.record(crate::events::EventKind::ClusterInitialized, None, Some(&id.name), format!("cluster created with {} as its first host", id.name));
    Ok(Json(json!({ "initialized": true, "host": id.name })))
}

/// A host as listed by the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostView {
    pub id: u32,
    pub name: String,
    pub api_addr: String,
    pub status: String,
    pub epoch: u64,
    pub capacity: Capacity,
    pub used: Capacity,
    /// As seen by the host that answered (`self` for itself).
    pub liveness: String,
    pub net_age_ms: Option<u64>,
    pub disk_age_ms: Option<u64>,
    pub fence_deadline_in_ms: Option<i64>,
    /// The epoch the host reports itself fenced in (heartbeat or slot, the newer), if it does.
    pub fenced_epoch: Option<u64>,
    pub leader: bool,
}

async fn hosts(State(a): State<Arc<Agent>>) -> Json<Vec<HostView>> {
    let asm = a.assessment();
    let leader = a.consensus.status().leader;
    let views = a.consensus.with_state(|s| {
        s.hosts
            .values()
            .map(|h| {
                let p = asm.as_ref().and_then(|x| x.peer(h.id).copied());
                let liveness = if h.id == a.me {
                    if a.status().fenced.is_some() {
                        "fenced(self)".to_string()
                    } else {
                        "self".to_string()
                    }
                } else {
                    p.map_or("unknown".into(), |p| match p.liveness {
                        HostLiveness::Alive => "alive".into(),
                        HostLiveness::Partitioned => "partitioned".into(),
                        HostLiveness::Dead => "dead".into(),
                        HostLiveness::Unknown => "unknown".into(),
                    })
                };
                HostView {
                    id: h.id.0,
                    name: h.name.clone(),
                    api_addr: h.api_addr.clone(),
                    status: format!("{:?}", h.status).to_lowercase(),
                    epoch: h.epoch,
                    capacity: h.capacity,
                    used: s.used(h.id),
                    liveness,
                    net_age_ms: p.and_then(|p| p.net_age_ms),
                    disk_age_ms: p.and_then(|p| p.disk_age_ms),
                    fence_deadline_in_ms: p.and_then(|p| p.fence_deadline).zip(asm.as_ref()).map(|(d, x)| d.0 as i64 - x.now.0 as i64),
                    fenced_epoch: p.and_then(|p| p.fenced_epoch),
                    leader: leader == Some(u64::from(h.id.0)),
                }
            })
            .collect()
    });
    Json(views)
}

/// A VM as listed by the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmView {
    pub name: String,
    pub protection: String,
    pub priority: i32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub desired: String,
    pub host: Option<String>,
    pub host_api: Option<String>,
    pub generation: Option<u64>,
    /// Set when HA gave up on it after failures on several hosts.
    pub error: Option<String>,
    pub failed_on: Vec<String>,
    /// Assigned after a failover but held until its restart group may start.
    pub held: bool,
    /// A best-effort VM waiting for room after a failover: retries spent.
    pub capacity_retries: Option<u32>,
    /// Desired running but placed nowhere: why no host takes it now.
    pub waiting: Option<String>,
    pub spec: VmSpec,
}

fn vm_views(a: &Agent) -> Vec<VmView> {
    a.consensus.with_state(|s| {
        s.vms
            .values()
            .map(|v| {
                let host = v.assignment.and_then(|x| s.hosts.get(&x.host));
                VmView {
                    name: v.spec.name.clone(),
                    protection: serde_json::to_value(v.spec.protection).ok().and_then(|x| x.as_str().map(str::to_string)).unwrap_or_default(),
                    priority: v.spec.priority,
                    vcpus: v.spec.vcpus,
                    memory_mib: v.spec.memory_mib,
                    desired: match v.desired {
                        PowerState::Running => "running".into(),
                        PowerState::Stopped => "stopped".into(),
                    },
                    host: host.map(|h| h.name.clone()),
                    host_api: host.map(|h| h.api_addr.clone()),
                    generation: v.assignment.map(|x| x.generation),
                    error: v.error.clone(),
                    failed_on: v.failed_on.iter().map(|h| s.hosts.get(h).map_or_else(|| h.to_string(), |r| r.name.clone())).collect(),
                    held: v.held,
                    capacity_retries: v.capacity_retries,
                    waiting: (v.desired == PowerState::Running && v.assignment.is_none())
                        .then(|| tandem_core::recovery::waiting_reason(s, &v.spec.name, s.active_hosts()))
                        .flatten(),
                    spec: v.spec.clone(),
                }
            })
            .collect()
    })
}

async fn vms(State(a): State<Arc<Agent>>) -> Json<Vec<VmView>> {
    Json(vm_views(&a))
}

async fn vm_show(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<VmView> {
    vm_views(&a).into_iter().find(|v| v.name == name).map(Json).ok_or_else(|| StateError::UnknownVm(name).into())
}

async fn vm_create(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<Value> {
    let spec: VmSpec = parse_strict(&body, "VM spec")?;
    spec.validate().and_then(|()| spec.check_arguments()).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid VM spec: {e}")))?;
    let name = spec.name.clone();
    submit(&a, Command::CreateVm { spec }).await?;
    Ok(Json(json!({ "created": name })))
}

async fn vm_delete(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Value> {
    submit(&a, Command::DeleteVm { name: name.clone() }).await?;
    Ok(Json(json!({ "deleted": name })))
}

/// `{"force": true}` in a write's body overrides admission control (recorded as an event).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ForceBody {
    #[serde(default)]
    force: bool,
}

fn force_of(body: &[u8]) -> Result<bool, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    Ok(parse::<ForceBody>(body, "request")?.force)
}

/// Submits a change that admission control judges; a forced one is recorded on the timeline.
async fn admitted(a: &Agent, cmd: Command, subject_vm: Option<&str>) -> Result<Value, ApiError> {
    match submit(a, cmd).await? {
        Applied::Forced { reason } => {
            a.events.record(crate::events::EventKind::AdmissionForced, subject_vm, None, format!("forced past admission control: {reason}"));
            Ok(json!({ "forced": reason }))
        }
        Applied::RuleSet { violations } => Ok(json!({ "violations": violations })),
        _ => Ok(json!({})),
    }
}

async fn vm_start(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Value> {
    let force = force_of(&body)?;
    // Overriding admission control is an admin's decision.
    if let Some(c) = CALLER.try_with(Clone::clone).ok().filter(|c| force && c.role != Role::Admin) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, format!("token '{}' is {}: --force needs an admin token", c.name, c.role)));
    }
    let mut out = admitted(&a, Command::SetPower { name: name.clone(), desired: PowerState::Running, force }, Some(&name)).await?;
    out["starting"] = json!(name);
    Ok(Json(out))
}

async fn vm_clear(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Value> {
    submit(&a, Command::ClearVmError { name: name.clone() }).await?;
    a.events.record(crate::events::EventKind::VmErrorCleared, Some(&name), None, format!("{name}: error state and failure history cleared by an operator"));
    Ok(Json(json!({ "cleared": name })))
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    spec: VmSpec,
    #[serde(default)]
    force: bool,
}

async fn vm_update(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Value> {
    let b: UpdateBody = parse_strict(&body, "VM update")?;
    if b.spec.name != name {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the spec names '{}', the path '{name}': a VM cannot be renamed", b.spec.name)));
    }
    b.spec.validate().and_then(|()| b.spec.check_arguments()).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid VM spec: {e}")))?;
    let mut out = admitted(&a, Command::UpdateVm { spec: b.spec, force: b.force }, Some(&name)).await?;
    out["updated"] = json!(name);
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeBody {
    mode: HostMode,
    #[serde(default)]
    force: bool,
}

async fn host_mode(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Value> {
    let b: ModeBody = parse(&body, "host mode")?;
    let host = a
        .consensus
        .with_state(|s| s.host_by_name(&name).map(|h| h.id))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown host '{name}'")))?;
    let mut out = admitted(&a, Command::SetHostMode { host, mode: b.mode, force: b.force }, None).await?;
    out["host"] = json!(name);
    out["mode"] = json!(b.mode);
    Ok(Json(out))
}

async fn ftt(State(a): State<Arc<Agent>>) -> ApiResult<Value> {
    // A search on a snapshot, off the runtime: it holds up neither the log nor other requests.
    let snap = a.consensus.snapshot();
    let report = a.heavy.run(move || snap.state.ftt()).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let target = a.consensus.with_state(|s| s.settings.ftt_target);
    Ok(Json(json!({ "report": report, "target": target })))
}

#[derive(Deserialize)]
struct PlanQuery {
    /// Comma-separated host names; absent: every single-host failure.
    fail: Option<String>,
}

/// What would happen if hosts failed: for each failure set, where every VM restarts and which
/// stay down, by the same planner the coordinator runs.
async fn plan(State(a): State<Arc<Agent>>, ApiQuery(q): ApiQuery<PlanQuery>) -> ApiResult<Value> {
    // Planned on a snapshot, off the runtime (every host's failure on a large state is heavy).
    let snap = a.consensus.snapshot();
    a.heavy.run(move || what_if(&snap.state, q.fail.as_deref())).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?
}

fn what_if(s: &tandem_core::state::ClusterState, fail: Option<&str>) -> ApiResult<Value> {
    {
        let sets: Vec<Vec<HostId>> = match fail {
            Some(list) => {
                let mut set = Vec::new();
                for n in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    let h = s.host_by_name(n).ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("fail= names an unknown host '{n}'")))?;
                    set.push(h.id);
                }
                if set.is_empty() {
                    return Err(ApiError::new(StatusCode::BAD_REQUEST, "fail= names no host"));
                }
                vec![set]
            }
            None => s.active_hosts().iter().map(|h| vec![h]).collect(),
        };
        let name = |h: HostId| s.hosts.get(&h).map_or_else(|| h.to_string(), |r| r.name.clone());
        let out: Vec<Value> = sets
            .iter()
            .map(|set| {
                let (p, quorum) = tandem_core::recovery::plan_what_if(s, set);
                let members = s.members().len();
                json!({
                    "failed": set.iter().map(|h| name(*h)).collect::<Vec<_>>(),
                    "quorum": quorum,
                    "note": (!quorum).then(|| format!(
                        "no quorum: {} of {members} voting hosts would be left and a majority ({}) is needed, so nothing restarts",
                        members - set.len().min(members),
                        members / 2 + 1
                    )),
                    "restarts": p.placements.iter().map(|(vm, h)| json!({ "vm": vm, "host": name(*h) })).collect::<Vec<_>>(),
                    "left_down": p.left_down.iter().map(|(vm, why)| json!({ "vm": vm, "reason": why })).collect::<Vec<_>>(),
                })
            })
            .collect();
        Ok(Json(json!(out)))
    }
}

async fn settings_show(State(a): State<Arc<Agent>>) -> Json<Settings> {
    Json(a.consensus.with_state(|s| s.settings.clone()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsBody {
    /// `null` clears the target.
    #[serde(default, with = "serde_with_null")]
    ftt_target: Option<Option<u32>>,
    #[serde(default)]
    vcpu_overcommit_pct: Option<u32>,
    /// Restart group → delay in ms; `null` restores the default for that group.
    #[serde(default)]
    group_delays_ms: BTreeMap<u8, Option<u64>>,
    #[serde(default)]
    force: bool,
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
mod serde_with_null {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u32>>, D::Error> {
        Option::<u32>::deserialize(d).map(Some)
    }
}

async fn settings_set(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<Value> {
    let b: SettingsBody = parse(&body, "settings")?;
    let mut settings = a.consensus.with_state(|s| s.settings.clone());
    if let Some(t) = b.ftt_target {
        settings.ftt_target = t;
    }
    if let Some(p) = b.vcpu_overcommit_pct {
        settings.vcpu_overcommit_pct = p;
    }
    for (group, delay) in b.group_delays_ms {
        match delay {
            Some(d) => settings.group_delays_ms.insert(group, d),
            None => settings.group_delays_ms.remove(&group),
        };
    }
    let mut out = admitted(&a, Command::SetSettings { settings: settings.clone(), force: b.force }, None).await?;
    out["settings"] = json!(settings);
    Ok(Json(out))
}

async fn rules(State(a): State<Arc<Agent>>) -> Json<Vec<Rule>> {
    Json(a.consensus.with_state(|s| s.rules.values().cloned().collect()))
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RuleBody {
    #[serde(flatten)]
    rule: Rule,
    #[serde(default)]
    force: bool,
}

async fn rule_set(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<Value> {
    let b: RuleBody = parse_strict(&body, "rule")?;
    let name = b.rule.name.clone();
    let mut out = admitted(&a, Command::SetRule { rule: b.rule, force: b.force }, None).await?;
    out["rule"] = json!(name);
    Ok(Json(out))
}

async fn rule_delete(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Value> {
    submit(&a, Command::DeleteRule { name: name.clone() }).await?;
    Ok(Json(json!({ "deleted": name })))
}

async fn vm_stop(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Value> {
    submit(&a, Command::SetPower { name: name.clone(), desired: PowerState::Stopped, force: false }).await?;
    Ok(Json(json!({ "stopping": name })))
}

async fn local(State(a): State<Arc<Agent>>) -> Json<Value> {
    Json(json!({ "host": a.cfg.name, "vms": a.driver.list() }))
}

#[derive(Deserialize)]
struct EventQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    host: Option<String>,
}

async fn events(State(a): State<Arc<Agent>>, ApiQuery(q): ApiQuery<EventQuery>) -> Json<Value> {
    let limit = q.limit.unwrap_or(1000).min(crate::events::EVENT_RING);
    let keep = |e: &crate::events::Event| {
        q.vm.as_ref().is_none_or(|v| e.vm.as_ref() == Some(v))
            && q.kind.as_ref().is_none_or(|k| e.kind.as_str() == k)
            && q.host.as_ref().is_none_or(|h| e.host == *h || e.subject.as_ref() == Some(h))
    };
    Json(json!(a.events.since(q.after, crate::events::EVENT_RING).into_iter().filter(keep).take(limit).collect::<Vec<_>>()))
}

async fn internal_propose(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let cmd: Command = parse(&body, "command")?;
    match a.consensus.propose(cmd).await {
        Ok(r) => Ok(Json(r).into_response()),
        Err(ConsensusError::NotLeader(_)) => Err(ApiError::new(StatusCode::MISDIRECTED_REQUEST, "not the leader")),
        Err(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, chain(&e))),
    }
}

async fn raft_append(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let req: openraft::raft::AppendEntriesRequest<TypeConfig> = parse(&body, "append request")?;
    Ok(Json(a.consensus.raft.append_entries(req).await).into_response())
}

async fn raft_vote(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let req: openraft::raft::VoteRequest<u64> = parse(&body, "vote request")?;
    Ok(Json(a.consensus.raft.vote(req).await).into_response())
}

async fn raft_snapshot(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let req: openraft::raft::InstallSnapshotRequest<TypeConfig> = parse(&body, "snapshot request")?;
    Ok(Json(a.consensus.raft.install_snapshot(req).await).into_response())
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
        assert!(parse_strict::<UpdateBody>(update.as_bytes(), "VM update").is_err());
    }
}
