//! VMs: list, show, create, update, start, stop, clear, delete.

use super::*;

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

pub(super) fn vm_views(a: &Agent) -> Vec<VmView> {
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

pub(super) async fn vms(State(a): State<Arc<Agent>>) -> Json<Vec<VmView>> {
    Json(vm_views(&a))
}

pub(super) async fn vm_show(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<VmView> {
    vm_views(&a).into_iter().find(|v| v.name == name).map(Json).ok_or_else(|| StateError::UnknownVm(name).into())
}

pub(super) async fn vm_create(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<Value> {
    let spec: VmSpec = parse_strict(&body, "VM spec")?;
    spec.validate().and_then(|()| spec.check_arguments()).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid VM spec: {e}")))?;
    let name = spec.name.clone();
    submit(&a, Command::CreateVm { spec }).await?;
    Ok(Json(json!({ "created": name })))
}

pub(super) async fn vm_delete(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Value> {
    submit(&a, Command::DeleteVm { name: name.clone() }).await?;
    Ok(Json(json!({ "deleted": name })))
}

/// `{"force": true}` in a write's body overrides admission control (recorded as an event).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct ForceBody {
    #[serde(default)]
    force: bool,
}

pub(super) fn force_of(body: &[u8]) -> Result<bool, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(false);
    }
    Ok(parse::<ForceBody>(body, "request")?.force)
}

/// Submits a change that admission control judges; a forced one is recorded on the timeline.
pub(super) async fn admitted(a: &Agent, cmd: Command, subject_vm: Option<&str>) -> Result<Value, ApiError> {
    match submit(a, cmd).await? {
        Applied::Forced { reason } => {
            a.events.record(crate::events::EventKind::AdmissionForced, subject_vm, None, format!("forced past admission control: {reason}"));
            Ok(json!({ "forced": reason }))
        }
        Applied::RuleSet { violations } => Ok(json!({ "violations": violations })),
        _ => Ok(json!({})),
    }
}

pub(super) async fn vm_start(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Value> {
    let force = force_of(&body)?;
    // Overriding admission control is an admin's decision.
    if let Some(c) = CALLER.try_with(Clone::clone).ok().filter(|c| force && c.role != Role::Admin) {
        return Err(ApiError::new(StatusCode::FORBIDDEN, format!("token '{}' is {}: --force needs an admin token", c.name, c.role)));
    }
    let mut out = admitted(&a, Command::SetPower { name: name.clone(), desired: PowerState::Running, force }, Some(&name)).await?;
    out["starting"] = json!(name);
    Ok(Json(out))
}

pub(super) async fn vm_clear(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Value> {
    submit(&a, Command::ClearVmError { name: name.clone() }).await?;
    a.events.record(crate::events::EventKind::VmErrorCleared, Some(&name), None, format!("{name}: error state and failure history cleared by an operator"));
    Ok(Json(json!({ "cleared": name })))
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateBody {
    spec: VmSpec,
    #[serde(default)]
    force: bool,
}

pub(super) async fn vm_update(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Value> {
    let b: UpdateBody = parse_strict(&body, "VM update")?;
    if b.spec.name != name {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the spec names '{}', the path '{name}': a VM cannot be renamed", b.spec.name)));
    }
    b.spec.validate().and_then(|()| b.spec.check_arguments()).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid VM spec: {e}")))?;
    let mut out = admitted(&a, Command::UpdateVm { spec: b.spec, force: b.force }, Some(&name)).await?;
    out["updated"] = json!(name);
    Ok(Json(out))
}

pub(super) async fn vm_stop(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Value> {
    submit(&a, Command::SetPower { name: name.clone(), desired: PowerState::Stopped, force: false }).await?;
    Ok(Json(json!({ "stopping": name })))
}
