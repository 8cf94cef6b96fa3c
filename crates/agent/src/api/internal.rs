//! Agent-to-agent endpoints (cluster token only): this host's running VMs, forwarded proposals and the Raft RPCs.

use super::*;

pub(super) async fn local(State(a): State<Arc<Agent>>) -> Json<LocalView> {
    Json(LocalView { host: a.cfg.name.clone(), vms: a.driver.list(), mirrors: a.mirror_links() })
}

pub(super) async fn internal_copies(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<CopyEndpoint> {
    let req: CopyRequest = parse(&body, "copy request")?;
    match a.serve_copy(&req).await {
        Ok(endpoint) => Ok(Json(endpoint)),
        Err(why) => Err(ApiError::new(StatusCode::CONFLICT, why)),
    }
}

pub(super) async fn internal_propose(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let cmd: Command = parse(&body, "command")?;
    match a.consensus.propose(cmd).await {
        Ok(r) => Ok(Json(r).into_response()),
        Err(ConsensusError::NotLeader(_)) => Err(ApiError::new(StatusCode::MISDIRECTED_REQUEST, "not the leader")),
        Err(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, chain(&e))),
    }
}

pub(super) async fn raft_append(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let req: openraft::raft::AppendEntriesRequest<TypeConfig> = parse(&body, "append request")?;
    Ok(Json(a.consensus.raft.append_entries(req).await).into_response())
}

pub(super) async fn raft_vote(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let req: openraft::raft::VoteRequest<u64> = parse(&body, "vote request")?;
    Ok(Json(a.consensus.vote(req).await).into_response())
}

pub(super) async fn raft_snapshot(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let req: openraft::raft::InstallSnapshotRequest<TypeConfig> = parse(&body, "snapshot request")?;
    Ok(Json(a.consensus.raft.install_snapshot(req).await).into_response())
}

/// The disk witness's node, if this host holds it; otherwise the caller tries again at its next
/// call (its route follows the claims).
fn held_witness(a: &Agent) -> Result<Arc<crate::agent::witness::HeldWitness>, ApiError> {
    a.held_witness().ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "this host does not hold the disk witness"))
}

pub(super) async fn witness_append(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let req: openraft::raft::AppendEntriesRequest<TypeConfig> = parse(&body, "append request")?;
    let w = held_witness(&a)?;
    Ok(Json(w.consensus.raft.append_entries(req).await).into_response())
}

pub(super) async fn witness_vote(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let req: openraft::raft::VoteRequest<u64> = parse(&body, "vote request")?;
    let w = held_witness(&a)?;
    Ok(Json(w.consensus.raft.vote(req).await).into_response())
}

pub(super) async fn witness_snapshot(State(a): State<Arc<Agent>>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    authorized(&a, &headers)?;
    let req: openraft::raft::InstallSnapshotRequest<TypeConfig> = parse(&body, "snapshot request")?;
    let w = held_witness(&a)?;
    Ok(Json(w.consensus.raft.install_snapshot(req).await).into_response())
}
