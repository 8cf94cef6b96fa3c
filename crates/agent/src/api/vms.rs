//! VMs: list, show, create, update, start, stop, clear, delete.

use super::*;

pub(super) fn vm_views(a: &Agent) -> Vec<VmView> {
    a.consensus.with_state(|s| {
        s.vms
            .values()
            .map(|v| {
                let host = v.assignment().and_then(|x| s.hosts.get(&x.host));
                VmView {
                    name: v.spec.name.clone(),
                    protection: v.spec.protection,
                    priority: v.spec.priority,
                    vcpus: v.spec.vcpus,
                    memory_mib: v.spec.memory_mib,
                    desired: v.desired(),
                    host: host.map(|h| h.name.clone()),
                    host_api: host.map(|h| h.api_addr.clone()),
                    generation: v.assignment().map(|x| x.generation),
                    error: v.error().map(str::to_string),
                    failed_on: v.failed_on.iter().map(|h| s.host_name(*h)).collect(),
                    held: v.held(),
                    capacity_retries: v.capacity_retries(),
                    waiting: match v.parked() {
                        Some((h, hold)) => Some(format!(
                            "shut down with {}'s planned stop: starts again when it returns{}",
                            s.host_name(h),
                            hold.map(|ms| format!(", or elsewhere {} s after it left", ms / 1000)).unwrap_or_default()
                        )),
                        None => (v.desired() == PowerState::Running && v.assignment().is_none())
                            .then(|| tandem_core::recovery::waiting_reason(s, &v.spec.name, s.active_hosts()))
                            .flatten(),
                    },
                    migrating_to: v.migrating_to().map(|t| s.hosts.get(&t.host).map_or_else(|| t.host.to_string(), |h| h.name.clone())),
                    home: v.home.map(|h| s.host_name(h)),
                    disk_host: v.start_host().map(|h| s.host_name(h)),
                    copies: v.copies.clone(),
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

pub(super) async fn vm_create(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<Created> {
    let spec: VmSpec = parse_strict(&body, "VM spec")?;
    spec.validate().and_then(|()| spec.check_arguments()).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid VM spec: {e}")))?;
    let name = spec.name.clone();
    submit(&a, Command::CreateVm { spec }).await?;
    Ok(Json(Created { created: name }))
}

pub(super) async fn vm_delete(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Deleted> {
    submit(&a, Command::DeleteVm { name: name.clone() }).await?;
    Ok(Json(Deleted { deleted: name }))
}

/// An optional body: blank reads as the type's default, anything else must parse as it.
fn body_or_default<T: Default + for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    parse(body, "request")
}

/// A body that must carry nothing: blank, or `{}`.
pub(super) fn empty_body(body: &[u8]) -> Result<(), ApiError> {
    body_or_default::<EmptyRequest>(body).map(|_| ())
}

/// A migration request in an optional body (blank: anywhere, unforced).
pub(super) fn force_of_migrate(body: &[u8]) -> Result<MigrateRequest, ApiError> {
    body_or_default::<MigrateRequest>(body)
}

/// `{"force": true}` in an optional body.
pub(super) fn force_of(body: &[u8]) -> Result<bool, ApiError> {
    Ok(body_or_default::<ForceRequest>(body)?.force)
}

/// Submits a change that admission control judges; a forced one is recorded on the timeline.
pub(super) async fn admitted(a: &Agent, cmd: Command, subject_vm: Option<&str>) -> Result<AdmissionNote, ApiError> {
    match submit(a, cmd).await? {
        Applied::Forced { reason } => {
            a.events.record(crate::events::EventKind::AdmissionForced, subject_vm, None, format!("forced past admission control: {reason}"));
            Ok(AdmissionNote { forced: Some(reason), violations: None })
        }
        Applied::RuleSet { violations } => Ok(AdmissionNote { forced: None, violations: Some(violations) }),
        _ => Ok(AdmissionNote::default()),
    }
}

/// Overriding admission control is an admin's decision: an operator's `--force` is refused.
pub(super) fn force_needs_admin(force: bool) -> Result<(), ApiError> {
    match CALLER.try_with(Clone::clone).ok().filter(|c| force && c.role != Role::Admin) {
        Some(c) => Err(ApiError::new(StatusCode::FORBIDDEN, format!("token '{}' is {}: --force needs an admin token", c.name, c.role))),
        None => Ok(()),
    }
}

pub(super) async fn vm_start(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Starting> {
    let force = force_of(&body)?;
    force_needs_admin(force)?;
    let admission = admitted(&a, Command::SetPower { name: name.clone(), desired: PowerState::Running, force }, Some(&name)).await?;
    Ok(Json(Starting { starting: name, admission }))
}

pub(super) async fn vm_clear(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Cleared> {
    empty_body(&body)?;
    submit(&a, Command::ClearVmError { name: name.clone() }).await?;
    a.events.record(crate::events::EventKind::VmErrorCleared, Some(&name), None, format!("{name}: error state and failure history cleared by an operator"));
    Ok(Json(Cleared { cleared: name }))
}

pub(super) async fn vm_update(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Updated> {
    let b: UpdateVmRequest = parse_strict(&body, "VM update")?;
    if b.spec.name != name {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("the spec names '{}', the path '{name}': a VM cannot be renamed", b.spec.name)));
    }
    b.spec.validate().and_then(|()| b.spec.check_arguments()).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid VM spec: {e}")))?;
    let admission = admitted(&a, Command::UpdateVm { spec: b.spec, force: b.force }, Some(&name)).await?;
    Ok(Json(Updated { updated: name, admission }))
}

pub(super) async fn vm_stop(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<Stopping> {
    empty_body(&body)?;
    submit(&a, Command::SetPower { name: name.clone(), desired: PowerState::Stopped, force: false }).await?;
    Ok(Json(Stopping { stopping: name }))
}
