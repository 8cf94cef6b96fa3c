//! Every HTTP endpoint the agent serves, with who may call it and what it does.
//!
//! This table is the one source for three things: the authorization check (a route that is
//! not listed here is refused, so nothing can be served undocumented), the OpenAPI document
//! (`GET /v1/openapi.json`, `tandem openapi`, kept in `docs/openapi.json` and tested for drift),
//! and the reference in the README.

use crate::views::*;
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{json, Map, Value};

/// Who may call an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone (the dashboard page and the API description).
    Public,
    /// Any valid token (admin, operator or read-only).
    Read,
    /// An operator or admin token: start, stop and clear VMs.
    Operate,
    /// An admin token (or the cluster token).
    Admin,
    /// Other agents only: the token derived from the cluster secret.
    Cluster,
}

/// Writes the JSON Schema of one body into a generator (and returns a reference to it).
pub type SchemaOf = fn(&mut SchemaGenerator) -> Schema;

/// The schema of `T`, as a reference into the document's components.
fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// A body this API does not describe field by field (openraft's own messages).
fn opaque(_: &mut SchemaGenerator) -> Schema {
    schemars::json_schema!({ "type": "object", "description": "an openraft message (agent to agent)" })
}

/// What an endpoint answers with on success.
#[derive(Clone, Copy)]
pub enum Answer {
    /// A JSON body of this schema.
    Json(SchemaOf),
    /// The dashboard page.
    Html,
    /// Prometheus text exposition.
    Prometheus,
    /// The OpenAPI document itself.
    OpenApi,
}

/// One method on one path.
#[derive(Clone, Copy)]
pub struct Endpoint {
    pub method: &'static str,
    /// In axum's syntax (`{name}` for a path parameter), which is also OpenAPI's.
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    /// The JSON request body's schema, when the endpoint takes one.
    pub request: Option<SchemaOf>,
    pub answer: Answer,
    /// Query parameters.
    pub query: &'static [QueryParam],
}

/// One query parameter of an endpoint.
#[derive(Clone, Copy, Debug)]
pub struct QueryParam {
    pub name: &'static str,
    pub description: &'static str,
    pub required: bool,
}

const fn optional(name: &'static str, description: &'static str) -> QueryParam {
    QueryParam { name, description, required: false }
}

/// A read (no body) answering JSON.
const fn get(path: &'static str, access: Access, summary: &'static str, answer: SchemaOf) -> Endpoint {
    Endpoint { method: "GET", path, access, summary, request: None, answer: Answer::Json(answer), query: &[] }
}

/// A read with query parameters.
const fn get_q(path: &'static str, access: Access, summary: &'static str, answer: SchemaOf, query: &'static [QueryParam]) -> Endpoint {
    Endpoint { method: "GET", path, access, summary, request: None, answer: Answer::Json(answer), query }
}

/// A write with a JSON body.
const fn write(method: &'static str, path: &'static str, access: Access, summary: &'static str, request: SchemaOf, answer: SchemaOf) -> Endpoint {
    Endpoint { method, path, access, summary, request: Some(request), answer: Answer::Json(answer), query: &[] }
}

/// A DELETE (no body).
const fn delete(path: &'static str, access: Access, summary: &'static str, answer: SchemaOf) -> Endpoint {
    Endpoint { method: "DELETE", path, access, summary, request: None, answer: Answer::Json(answer), query: &[] }
}

use Access::{Admin, Cluster, Operate, Public, Read};

/// The table. Order is the order of the OpenAPI document.
pub const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        method: "GET",
        path: "/",
        access: Public,
        summary: "The web dashboard (one HTML page; it asks for a token).",
        request: None,
        answer: Answer::Html,
        query: &[],
    },
    Endpoint { method: "GET", path: "/v1/openapi.json", access: Public, summary: "This API's OpenAPI 3 description.", request: None, answer: Answer::OpenApi, query: &[] },
    Endpoint {
        method: "GET",
        path: "/metrics",
        access: Read,
        summary: "Prometheus metrics of this agent: liveness, heartbeat ages, disk latency, VMs, failovers, FTT, consensus.",
        request: None,
        answer: Answer::Prometheus,
        query: &[],
    },
    get("/v1/status", Read, "This agent: consensus role and leader, fencing state, rejected input counters.", schema::<StatusView>),
    get("/v1/identity", Read, "This host's id, name, addresses and capacity.", schema::<Identity>),
    get_q(
        "/v1/join-proof",
        Public,
        "This host's identity and a MAC over it and the challenge with the cluster secret: a host proves it holds the secret before the cluster sends it any token.",
        schema::<JoinProof>,
        &[QueryParam { name: "challenge", description: "random hex chosen by the caller (16-128 characters)", required: true }],
    ),
    write("POST", "/v1/cluster/init", Admin, "Make this agent the first host of a new cluster.", schema::<EmptyRequest>, schema::<Initialized>),
    get("/v1/hosts", Read, "Hosts with status, epoch, capacity use and liveness as seen from this agent.", schema::<Vec<HostView>>),
    write("POST", "/v1/hosts/join", Admin, "Add the agent listening at api_addr to the cluster.", schema::<JoinRequest>, schema::<Joined>),
    write(
        "POST",
        "/v1/hosts/{name}/mode",
        Admin,
        "Set a host's mode; refused if it breaks the FTT target unless forced.",
        schema::<HostModeRequest>,
        schema::<HostModeSet>,
    ),
    get("/v1/vms", Read, "Every VM with its desired state, host, generation, error and restart hold.", schema::<Vec<VmView>>),
    write("POST", "/v1/vms", Admin, "Create a VM (stopped) from a VM spec.", schema::<VmSpec>, schema::<Created>),
    get("/v1/vms/{name}", Read, "One VM.", schema::<VmView>),
    write(
        "PUT",
        "/v1/vms/{name}",
        Admin,
        "Change a VM's spec; refused if it breaks the FTT target unless forced.",
        schema::<UpdateVmRequest>,
        schema::<Updated>,
    ),
    delete("/v1/vms/{name}", Admin, "Delete a stopped VM.", schema::<Deleted>),
    write(
        "POST",
        "/v1/vms/{name}/start",
        Operate,
        "Start a VM; refused if it breaks the FTT target unless forced (force needs an admin token).",
        schema::<ForceRequest>,
        schema::<Starting>,
    ),
    write(
        "POST",
        "/v1/vms/{name}/stop",
        Operate,
        "Stop a VM (ACPI power-down, then kill after the stop timeout).",
        schema::<EmptyRequest>,
        schema::<Stopping>,
    ),
    write(
        "POST",
        "/v1/vms/{name}/migrate",
        Operate,
        "Live-migrate a running VM (to a named host, or the roomiest that may take it); refused if it breaks the FTT target unless forced (admin).",
        schema::<MigrateRequest>,
        schema::<MigrationBegun>,
    ),
    delete("/v1/vms/{name}/migrate", Operate, "Cancel a VM's live migration: it runs on at its source.", schema::<MigrationCancelled>),
    write(
        "POST",
        "/v1/hosts/{name}/shutdown",
        Admin,
        "A planned stop of this host's agent under a policy (kill, migrate, shutdown, freeze); only the named host's own agent takes it.",
        schema::<ShutdownRequest>,
        schema::<ShutdownAsked>,
    ),
    get("/v1/hosts/{name}/evacuation", Read, "Where each VM of a host would go if it entered maintenance now, or why it cannot move live.", schema::<EvacuationPlan>),
    get("/v1/migrations", Read, "Live migrations in progress (with progress where this host drives them) and the last outcomes here.", schema::<MigrationsView>),
    write("POST", "/v1/vms/{name}/clear", Operate, "Clear a VM's error state and failure history.", schema::<EmptyRequest>, schema::<Cleared>),
    get("/v1/ftt", Read, "Failures to tolerate (exact or lower bound), the target, what limits it, and what the loss of each site would do.", schema::<FttView>),
    get_q(
        "/v1/plan",
        Read,
        "Recovery plans: for each single host failure, for the hosts in `fail` failing together, or for every host of site `fail_site`.",
        schema::<Vec<FailurePlan>>,
        &[optional("fail", "comma-separated host names failing together"), optional("fail_site", "a site: all its hosts fail together (not with `fail`)")],
    ),
    get_q(
        "/v1/rebalance",
        Read,
        "Live migrations that would remove placement-rule violations and even out memory use (carried out one `migrate` per move), and what cannot be fixed.",
        schema::<RebalanceView>,
        &[optional("rule", "only this rule's violations"), optional("balance", "even out memory use too: true (default) or false")],
    ),
    get("/v1/settings", Read, "Cluster settings: FTT target, vCPU overcommit, restart group delays.", schema::<Settings>),
    write(
        "POST",
        "/v1/settings",
        Admin,
        "Change cluster settings; refused if it breaks the FTT target unless forced.",
        schema::<SettingsRequest>,
        schema::<SettingsSet>,
    ),
    get("/v1/rules", Read, "Placement rules.", schema::<Vec<Rule>>),
    write("POST", "/v1/rules", Admin, "Add a placement rule (checked for feasibility and conflicts).", schema::<RuleRequest>, schema::<RuleAdded>),
    delete("/v1/rules/{name}", Admin, "Delete a placement rule.", schema::<Deleted>),
    get("/v1/tokens", Admin, "API tokens: names and roles (never the tokens).", schema::<Vec<TokenView>>),
    write("POST", "/v1/tokens", Admin, "Make an API token; the answer holds the token, shown this once.", schema::<TokenRequest>, schema::<NewToken>),
    delete("/v1/tokens/{name}", Admin, "Revoke an API token.", schema::<Revoked>),
    get("/v1/local", Read, "The workloads this host's driver runs now, with generation and exit.", schema::<LocalView>),
    get_q(
        "/v1/events",
        Read,
        "The HA timeline recorded by this agent, oldest first.",
        schema::<Vec<Event>>,
        &[
            optional("after", "only events with a larger seq"),
            optional("limit", "at most this many (default 1000)"),
            optional("vm", "only events about this VM"),
            optional("host", "only events recorded by, or about, this host"),
            optional("kind", "only events of this kind (e.g. peer-dead, failover-committed)"),
        ],
    ),
    get_q(
        "/v1/failovers",
        Read,
        "The recent failovers across the cluster, newest first: last evidence of life, declared dead, fence deadline, decided, committed, and each moved VM's start on its new host.",
        schema::<Vec<FailoverView>>,
        &[optional("limit", "at most this many (default 10)")],
    ),
    write("POST", "/v1/internal/propose", Cluster, "Forwarded consensus command (agent to agent).", opaque, opaque),
    write("POST", "/v1/internal/incoming", Cluster, "Prepare a live migration's paused destination (source agent to destination agent).", schema::<IncomingRequest>, schema::<IncomingEndpoint>),
    write(
        "POST",
        "/v1/internal/copies",
        Cluster,
        "Serve this site's copy of a site-mirrored VM's disk to the host running it at another site (agent to agent).",
        schema::<CopyRequest>,
        schema::<CopyEndpoint>,
    ),
    write("POST", "/raft/append", Cluster, "Raft AppendEntries (agent to agent).", opaque, opaque),
    write("POST", "/raft/vote", Cluster, "Raft RequestVote (agent to agent).", opaque, opaque),
    write("POST", "/raft/snapshot", Cluster, "Raft InstallSnapshot chunk (agent to agent).", opaque, opaque),
    write("POST", "/raft/witness/append", Cluster, "Raft AppendEntries to the disk witness, on the host that holds it (agent to agent).", opaque, opaque),
    write("POST", "/raft/witness/vote", Cluster, "Raft RequestVote to the disk witness, on the host that holds it (agent to agent).", opaque, opaque),
    write("POST", "/raft/witness/snapshot", Cluster, "Raft InstallSnapshot chunk to the disk witness, on the host that holds it (agent to agent).", opaque, opaque),
];

/// The methods `route` answers (for a 405's `Allow` header).
#[must_use]
pub fn methods(route: &str) -> Vec<&'static str> {
    ENDPOINTS.iter().filter(|e| e.path == route).map(|e| e.method).collect()
}

/// The endpoint a request was routed to, by method and matched route.
#[must_use]
pub fn find(method: &str, route: &str) -> Option<&'static Endpoint> {
    ENDPOINTS.iter().find(|e| e.method == method && e.path == route)
}

fn operation(e: &Endpoint, g: &mut SchemaGenerator) -> Value {
    let mut op = Map::new();
    op.insert("summary".into(), json!(e.summary));
    op.insert("operationId".into(), json!(format!("{} {}", e.method.to_lowercase(), e.path)));
    let mut params: Vec<Value> = e
        .path
        .split('/')
        .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
        .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
        .collect();
    params.extend(
        e.query.iter().map(|q| json!({ "name": q.name, "in": "query", "required": q.required, "description": q.description, "schema": { "type": "string" } })),
    );
    if !params.is_empty() {
        op.insert("parameters".into(), Value::Array(params));
    }
    if let Some(request) = e.request {
        op.insert("requestBody".into(), json!({ "required": true, "content": { "application/json": { "schema": request(g).to_value() } } }));
    }
    let error = json!({ "content": { "application/json": { "schema": schema::<ErrorBody>(g).to_value() } } });
    let mut responses = Map::new();
    let success = match e.answer {
        Answer::Json(answer) => json!({ "description": "success", "content": { "application/json": { "schema": answer(g).to_value() } } }),
        Answer::Html => json!({ "description": "success", "content": { "text/html": { "schema": { "type": "string" } } } }),
        Answer::Prometheus => json!({ "description": "success", "content": { "text/plain": { "schema": { "type": "string" } } } }),
        Answer::OpenApi => json!({ "description": "success", "content": { "application/json": { "schema": { "type": "object" } } } }),
    };
    responses.insert("200".into(), success);
    if e.request.is_some() || !e.query.is_empty() {
        responses.insert("400".into(), json!({ "description": "malformed or invalid request", "content": error["content"] }));
    }
    match e.access {
        Access::Public => {
            op.insert("security".into(), json!([]));
        }
        Access::Read | Access::Cluster => {
            responses.insert("401".into(), json!({ "description": "missing or unknown token", "content": error["content"] }));
        }
        Access::Admin | Access::Operate => {
            responses.insert("401".into(), json!({ "description": "missing or unknown token", "content": error["content"] }));
            responses.insert("403".into(), json!({ "description": "the token's role does not allow this", "content": error["content"] }));
        }
    }
    // A name in the path, or in a write's body (a rule's VMs), may name nothing.
    if e.path.contains('{') || e.request.is_some() {
        responses.insert("404".into(), json!({ "description": "unknown name", "content": error["content"] }));
    }
    if e.method != "GET" {
        responses.insert("409".into(), json!({ "description": "refused by the cluster (conflict, admission control)", "content": error["content"] }));
        responses.insert("413".into(), json!({ "description": "request body too large" }));
        responses.insert("503".into(), json!({ "description": "no leader or no quorum", "content": error["content"] }));
    }
    op.insert("responses".into(), Value::Object(responses));
    op.insert(
        "x-tandem-access".into(),
        json!(match e.access {
            Access::Public => "public",
            Access::Read => "read-only, operator or admin token",
            Access::Operate => "operator or admin token",
            Access::Admin => "admin token",
            Access::Cluster => "cluster token (agents only)",
        }),
    );
    Value::Object(op)
}

/// The OpenAPI 3 document, built from [`ENDPOINTS`] and the schemas of [`crate::views`].
#[must_use]
pub fn openapi() -> Value {
    let mut g = SchemaSettings::openapi3().into_generator();
    let mut paths = Map::new();
    for e in ENDPOINTS {
        let op = operation(e, &mut g);
        let entry = paths.entry(e.path.to_string()).or_insert_with(|| json!({}));
        if let Some(m) = entry.as_object_mut() {
            m.insert(e.method.to_lowercase(), op);
        }
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Tandem agent API",
            "version": "1",
            "description": "Served by every agent; writes are forwarded to the consensus leader. Bearer tokens: admin or read-only (see `tandem token`), or the cluster token derived from the cluster secret."
        },
        "paths": Value::Object(paths),
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": Value::Object(g.take_definitions(true))
        },
        "security": [{ "bearer": [] }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The OpenAPI document kept in the repository is the one the code generates.
    #[test]
    fn openapi_document_in_the_repo_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
        let generated = serde_json::to_string_pretty(&openapi()).expect("json") + "\n";
        if std::env::var("TANDEM_WRITE_OPENAPI").is_ok() {
            std::fs::write(&path, &generated).expect("write docs/openapi.json");
        }
        let kept = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            kept == generated,
            "docs/openapi.json is stale: run `TANDEM_WRITE_OPENAPI=1 cargo test -p tandem-agent openapi` (or `tandem openapi > docs/openapi.json`)"
        );
    }

    #[test]
    fn every_endpoint_is_listed_once_and_described() {
        for (i, e) in ENDPOINTS.iter().enumerate() {
            assert!(ENDPOINTS[..i].iter().all(|o| (o.method, o.path) != (e.method, e.path)), "{} {} twice", e.method, e.path);
            assert!(!e.summary.is_empty());
            if e.method != "GET" && e.method != "DELETE" {
                assert!(e.request.is_some(), "{} {} takes a body", e.method, e.path);
            }
        }
        assert_eq!(openapi()["paths"]["/v1/vms/{name}"]["put"]["x-tandem-access"], "admin token");
    }
}
