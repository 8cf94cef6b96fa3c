//! Live migration: start (`POST /v1/vms/{name}/migrate`), cancel (`DELETE`), follow
//! (`GET /v1/migrations`), and the destination's side (`POST /v1/internal/incoming`).

use super::vms::{admitted, force_needs_admin, force_of_migrate};
use super::*;

pub(super) async fn vm_migrate(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<MigrationBegun> {
    let req = force_of_migrate(&body)?;
    force_needs_admin(req.force)?;
    let (to, source) = a.consensus.with_state(|s| {
        let vm = s.vms.get(&name).ok_or_else(|| StateError::UnknownVm(name.clone()))?;
        let source = vm.assignment().and_then(|x| s.hosts.get(&x.host)).map(|h| (h.name.clone(), h.api_addr.clone()));
        let to = match &req.to {
            Some(host) => s.host_by_name(host).map(|h| h.id).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown host '{host}'")))?,
            None => s.migration_target(&name).ok_or_else(|| {
                ApiError::new(StatusCode::CONFLICT, format!("VM '{name}' cannot be migrated: no other host may take it now (room, mode, hard rules)"))
            })?,
        };
        Ok::<_, ApiError>((to, source))
    })?;
    // The destination must be one this host hears: a migration towards a host nobody reaches
    // would only end in an abort.
    let heard = a.assessment().and_then(|x| x.peer(to).map(|p| p.liveness));
    if to != a.me && heard.is_some_and(|l| l != HostLiveness::Alive) {
        let host = a.consensus.with_state(|s| s.hosts.get(&to).map_or_else(|| to.to_string(), |h| h.name.clone()));
        return Err(ApiError::new(StatusCode::CONFLICT, format!("VM '{name}' cannot be migrated to {host}: it is unreachable from here ({heard:?})")));
    }
    let cmd = a.consensus.with_state(|s| s.start_migration_command(&name, to, req.force, false));
    let admission = admitted(&a, cmd, Some(&name)).await?;
    let (from, source_api) = source.unwrap_or_default();
    let (dest, generation) = a.consensus.with_state(|s| {
        let dest = s.hosts.get(&to).map_or_else(|| to.to_string(), |h| h.name.clone());
        (dest, s.vms.get(&name).and_then(|v| v.migrating_to()).map_or(0, |t| t.generation))
    });
    a.events.record(crate::events::EventKind::MigrationStarted, Some(&name), None, format!("live migration of {name} from {from} to {dest} begins"));
    Ok(Json(MigrationBegun { name, from, to: dest, generation, source_api, admission }))
}

pub(super) async fn vm_migrate_cancel(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<MigrationCancelled> {
    let generation = a.consensus.with_state(|s| {
        let vm = s.vms.get(&name).ok_or_else(|| StateError::UnknownVm(name.clone()))?;
        vm.migrating_to().map(|t| t.generation).ok_or_else(|| ApiError::new(StatusCode::CONFLICT, format!("VM '{name}' is not migrating")))
    })?;
    let who = CALLER.try_with(|c| c.name.clone()).unwrap_or_else(|_| "internal".into());
    submit(&a, Command::MigrationAbort { name: name.clone(), generation, reason: format!("cancelled by token '{who}'") }).await?;
    Ok(Json(MigrationCancelled { cancelled: name }))
}

pub(super) async fn migrations(State(a): State<Arc<Agent>>) -> Json<MigrationsView> {
    Json(a.migrations_view())
}

pub(super) async fn internal_incoming(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<IncomingEndpoint> {
    let req: IncomingRequest = parse(&body, "incoming request")?;
    match a.prepare_incoming(&req).await {
        Ok(ready) => Ok(Json(ready)),
        Err(why) => Err(ApiError::new(StatusCode::CONFLICT, why)),
    }
}
