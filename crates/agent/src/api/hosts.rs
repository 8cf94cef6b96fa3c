//! Hosts: the list with each one's liveness as this agent sees it, and host modes.

use super::*;

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

pub(super) async fn hosts(State(a): State<Arc<Agent>>) -> Json<Vec<HostView>> {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ModeBody {
    mode: HostMode,
    #[serde(default)]
    force: bool,
}

pub(super) async fn host_mode(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Value> {
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
