//! Joining a host: the joining agent proves it holds the cluster secret (a MAC over a fresh
//! challenge and its identity) before the cluster sends it anything that carries a token.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChallengeQuery {
    challenge: String,
}

pub(super) async fn join_proof(State(a): State<Arc<Agent>>, ApiQuery(q): ApiQuery<ChallengeQuery>) -> ApiResult<JoinProof> {
    if !(16..=128).contains(&q.challenge.len()) || !q.challenge.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "challenge must be 16-128 hex characters"));
    }
    let id = identity(State(Arc::clone(&a))).await.0;
    let identity = serde_json::to_string(&id).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let proof = a.key.join_proof(&q.challenge, identity.as_bytes());
    Ok(Json(JoinProof { identity, proof }))
}

pub(super) async fn host_join(State(a): State<Arc<Agent>>, body: Bytes) -> Result<Response, ApiError> {
    let req: JoinRequest = parse(&body, "join request")?;
    if !a.consensus.is_leader() {
        // The caller was authorized here; the leader is asked on the cluster's behalf.
        let r = a.forward_to_leader(a.consensus.leader_addr(), "/v1/hosts/join", body.to_vec(), Duration::from_secs(60)).await.map_err(ApiError::from)?;
        let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
        return Ok((status, [("content-type", "application/json")], r.body).into_response());
    }
    // The address comes from the API caller: it gets no token until it has proved that it holds
    // the cluster secret (a fresh challenge, answered with a MAC).
    let challenge: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let r = a
        .rpc()
        .call(&req.api_addr, &format!("/v1/join-proof?challenge={challenge}"), None, None, Duration::from_secs(5))
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("cannot reach the joining host: {}", chain(&e))))?;
    let answer: JoinProof = parse(&r.body, "join proof of the joining host")?;
    if !a.key.verify_join_proof(&challenge, answer.identity.as_bytes(), &answer.proof) {
        return Err(ApiError::new(StatusCode::CONFLICT, format!("{} did not prove that it holds the cluster secret; nothing was sent to it", req.api_addr)));
    }
    let id: Identity = parse(answer.identity.as_bytes(), "identity of the joining host")?;
    let exists = a.consensus.with_state(|s| s.hosts.get(&HostId(id.host_id)).map(|h| h.name.clone()));
    match exists {
        Some(name) if name == id.name => {}
        Some(name) => {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("host id {} is already taken by {name}", id.host_id)));
        }
        None => {
            submit(
                &a,
                Command::AddHost {
                    id: HostId(id.host_id),
                    name: id.name.clone(),
                    api_addr: id.api_addr.clone(),
                    heartbeat_addr: id.heartbeat_addr.clone(),
                    capacity: id.capacity,
                },
            )
            .await?;
        }
    }
    a.consensus.add_voter(u64::from(id.host_id), &id.api_addr).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, chain(&e)))?;
    a.events.record(crate::events::EventKind::HostAdded, None, Some(&id.name), format!("{} joined as host {}", id.name, id.host_id));
    Ok(Json(Joined { joined: id.name, host_id: id.host_id }).into_response())
}
