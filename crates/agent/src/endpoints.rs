//! Every HTTP endpoint the agent serves, with who may call it and what it does.
//!
//! This table is the one source for three things: the authorization check (a route that is
//! not listed here is refused, so nothing can be served undocumented), the OpenAPI document
//! (`GET /v1/openapi.json`, `tandem openapi`, kept in `docs/openapi.json` and tested for drift),
//! and the reference in the README.

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

/// One method on one path.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub method: &'static str,
    /// In axum's syntax (`{name}` for a path parameter), which is also OpenAPI's.
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    /// What the JSON request body holds, when there is one.
    pub body: Option<&'static str>,
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

const fn ep(method: &'static str, path: &'static str, access: Access, summary: &'static str) -> Endpoint {
    Endpoint { method, path, access, summary, body: None, query: &[] }
}

const fn with_body(method: &'static str, path: &'static str, access: Access, summary: &'static str, body: &'static str) -> Endpoint {
    Endpoint { method, path, access, summary, body: Some(body), query: &[] }
}

use Access::{Admin, Cluster, Operate, Public, Read};

/// The table. Order is the order of the OpenAPI document.
pub const ENDPOINTS: &[Endpoint] = &[
    ep("GET", "/", Public, "The web dashboard (one HTML page; it asks for a token)."),
    ep("GET", "/v1/openapi.json", Public, "This API's OpenAPI 3 description."),
    ep("GET", "/metrics", Read, "Prometheus metrics of this agent: liveness, heartbeat ages, disk latency, VMs, failovers, FTT, consensus."),
    ep("GET", "/v1/status", Read, "This agent: consensus role and leader, fencing state, rejected input counters."),
    ep("GET", "/v1/identity", Read, "This host's id, name, addresses and capacity."),
    Endpoint {
        method: "GET",
        path: "/v1/join-proof",
        access: Public,
        summary: "This host's identity and a MAC over it and the challenge with the cluster secret: a host proves it holds the secret before the cluster sends it any token.",
        body: None,
        query: &[QueryParam { name: "challenge", description: "random hex chosen by the caller (16-128 characters)", required: true }],
    },
    with_body("POST", "/v1/cluster/init", Admin, "Make this agent the first host of a new cluster.", "{}"),
    ep("GET", "/v1/hosts", Read, "Hosts with status, epoch, capacity use and liveness as seen from this agent."),
    with_body("POST", "/v1/hosts/join", Admin, "Add the agent listening at api_addr to the cluster.", "{\"api_addr\": \"ip:port\"}"),
    with_body(
        "POST",
        "/v1/hosts/{name}/mode",
        Admin,
        "Set a host's mode; refused if it breaks the FTT target unless forced.",
        "{\"mode\": \"normal|maintenance|disabled\", \"force\": false}",
    ),
    ep("GET", "/v1/vms", Read, "Every VM with its desired state, host, generation, error and restart hold."),
    with_body("POST", "/v1/vms", Admin, "Create a VM (stopped) from a VM spec.", "a VM spec (see the README)"),
    ep("GET", "/v1/vms/{name}", Read, "One VM."),
    with_body(
        "PUT",
        "/v1/vms/{name}",
        Admin,
        "Change a VM's spec; refused if it breaks the FTT target unless forced.",
        "{\"spec\": VM spec, \"force\": false}",
    ),
    ep("DELETE", "/v1/vms/{name}", Admin, "Delete a stopped VM."),
    with_body("POST", "/v1/vms/{name}/start", Operate, "Start a VM; refused if it breaks the FTT target unless forced (force needs an admin token).", "{\"force\": false}"),
    with_body("POST", "/v1/vms/{name}/stop", Operate, "Stop a VM (ACPI power-down, then kill after the stop timeout).", "{}"),
    with_body("POST", "/v1/vms/{name}/clear", Operate, "Clear a VM's error state and failure history.", "{}"),
    ep("GET", "/v1/ftt", Read, "Failures to tolerate (exact or lower bound), the target, and what limits it."),
    Endpoint {
        method: "GET",
        path: "/v1/plan",
        access: Read,
        summary: "Recovery plans: for each single host failure, or for the hosts in `fail` failing together.",
        body: None,
        query: &[optional("fail", "comma-separated host names failing together")],
    },
    ep("GET", "/v1/settings", Read, "Cluster settings: FTT target, vCPU overcommit, restart group delays."),
    with_body(
        "POST",
        "/v1/settings",
        Admin,
        "Change cluster settings; refused if it breaks the FTT target unless forced.",
        "{\"ftt_target\": N|null, \"vcpu_overcommit_pct\": P, \"group_delays_ms\": {\"GROUP\": MS|null}, \"force\": false}",
    ),
    ep("GET", "/v1/rules", Read, "Placement rules."),
    with_body(
        "POST",
        "/v1/rules",
        Admin,
        "Add a placement rule (checked for feasibility and conflicts).",
        "{\"rule\": {\"name\", \"kind\", \"hard\", \"vms\"}, \"force\": false}",
    ),
    ep("DELETE", "/v1/rules/{name}", Admin, "Delete a placement rule."),
    ep("GET", "/v1/tokens", Admin, "API tokens: names and roles (never the tokens)."),
    with_body(
        "POST",
        "/v1/tokens",
        Admin,
        "Make an API token; the answer holds the token, shown this once.",
        "{\"name\": \"ops\", \"role\": \"admin|read-only\"}",
    ),
    ep("DELETE", "/v1/tokens/{name}", Admin, "Revoke an API token."),
    ep("GET", "/v1/local", Read, "The workloads this host's driver runs now, with generation and exit."),
    Endpoint {
        method: "GET",
        path: "/v1/events",
        access: Read,
        summary: "The HA timeline recorded by this agent, oldest first.",
        body: None,
        query: &[
            optional("after", "only events with a larger seq"),
            optional("limit", "at most this many (default 1000)"),
            optional("vm", "only events about this VM"),
            optional("host", "only events recorded by, or about, this host"),
            optional("kind", "only events of this kind (e.g. peer-dead, failover-committed)"),
        ],
    },
    with_body("POST", "/v1/internal/propose", Cluster, "Forwarded consensus command (agent to agent).", "a consensus command"),
    with_body("POST", "/raft/append", Cluster, "Raft AppendEntries (agent to agent).", "openraft request"),
    with_body("POST", "/raft/vote", Cluster, "Raft RequestVote (agent to agent).", "openraft request"),
    with_body("POST", "/raft/snapshot", Cluster, "Raft InstallSnapshot chunk (agent to agent).", "openraft request"),
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

fn operation(e: &Endpoint) -> Value {
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
    if let Some(b) = e.body {
        op.insert("requestBody".into(), json!({ "required": true, "content": { "application/json": { "schema": { "type": "object", "description": b } } } }));
    }
    let error = json!({ "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } });
    let mut responses = Map::new();
    responses.insert("200".into(), json!({ "description": "success" }));
    if e.body.is_some() || !e.query.is_empty() {
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
    if e.path.contains('{') {
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

/// The OpenAPI 3 document, built from [`ENDPOINTS`].
#[must_use]
pub fn openapi() -> Value {
    let mut paths = Map::new();
    for e in ENDPOINTS {
        let entry = paths.entry(e.path.to_string()).or_insert_with(|| json!({}));
        if let Some(m) = entry.as_object_mut() {
            m.insert(e.method.to_lowercase(), operation(e));
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
            "schemas": { "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } } }
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
                assert!(e.body.is_some(), "{} {} takes a body", e.method, e.path);
            }
        }
        assert_eq!(openapi()["paths"]["/v1/vms/{name}"]["put"]["x-tandem-access"], "admin token");
    }
}
