//! Hosts: the list with each one's liveness as this agent sees it, and host modes.

use super::*;

/// A host as listed by the API.
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
                        LivenessView::FencedItself
                    } else {
                        LivenessView::Itself
                    }
                } else {
                    p.map_or(LivenessView::Unknown, |p| match p.liveness {
                        HostLiveness::Alive => LivenessView::Alive,
                        HostLiveness::Partitioned => LivenessView::Partitioned,
                        HostLiveness::Dead => LivenessView::Dead,
                        HostLiveness::Unknown => LivenessView::Unknown,
                    })
                };
                HostView {
                    id: h.id.0,
                    name: h.name.clone(),
                    api_addr: h.api_addr.clone(),
                    status: h.status,
                    epoch: h.epoch,
                    capacity: h.capacity,
                    used: s.used(h.id),
                    liveness,
                    net_age_ms: p.and_then(|p| p.net_age_ms),
                    disk_age_ms: p.and_then(|p| p.disk_age_ms),
                    fence_deadline_in_ms: p.and_then(|p| p.fence_deadline).zip(asm.as_ref()).map(|(d, x)| d.0 as i64 - x.now.0 as i64),
                    fenced_epoch: p.and_then(|p| p.fenced_epoch),
                    leader: leader == Some(u64::from(h.id.0)),
                    mode: h.mode,
                    site: h.site.clone(),
                }
            })
            .collect()
    });
    Json(views)
}

pub(super) async fn host_mode(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<HostModeSet> {
    let b: HostModeRequest = parse(&body, "host mode")?;
    let host = a
        .consensus
        .with_state(|s| s.host_by_name(&name).map(|h| h.id))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown host '{name}'")))?;
    let admission = admitted(&a, Command::SetHostMode { host, mode: b.mode, force: b.force }, None).await?;
    Ok(Json(HostModeSet { host: name, mode: b.mode, admission }))
}

pub(super) async fn host_evacuation(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<EvacuationPlan> {
    // The coordinator's memory of failed evacuations, when this agent leads: such a VM would
    // not be moved live again.
    let given_up = if a.consensus.is_leader() { a.evacuations_given_up() } else { Default::default() };
    let (steps, not_coming_back) = a.consensus.with_state(|s| {
        let host = s.host_by_name(&name).map(|h| h.id).ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("unknown host '{name}'")))?;
        let steps = tandem_core::evacuation::evacuation_plan(s, host)
            .into_iter()
            .map(|(vm, to)| match (to, given_up.get(&vm)) {
                (_, Some(n)) => EvacuationStep { why_not: Some(format!("its live migration did not complete {n} times")), vm, to: None, live_failed: Some(*n) },
                (Ok(h), None) => EvacuationStep { vm, to: Some(s.host_name(h)), why_not: None, live_failed: None },
                (Err(why), None) => EvacuationStep { vm, to: None, why_not: Some(why), live_failed: None },
            })
            .collect::<Vec<_>>();
        let not_coming_back = given_up
            .iter()
            .filter_map(|(vm, n)| {
                // Away from this home, on a host not in maintenance (else it was given up leaving
                // that host, which `steps` of that host's plan says).
                let v = s.vms.get(vm).filter(|v| v.home == Some(host))?;
                let at = v.assignment().filter(|a| a.host != host && s.hosts.get(&a.host).is_some_and(|h| h.mode != HostMode::Maintenance))?;
                let why = format!("its live migration back did not complete {n} times");
                Some(EvacuationStep { vm: vm.clone(), to: Some(s.host_name(at.host)), why_not: Some(why), live_failed: Some(*n) })
            })
            .collect();
        Ok::<_, ApiError>((steps, not_coming_back))
    })?;
    Ok(Json(EvacuationPlan { host: name, steps, not_coming_back }))
}

/// A planned stop of this agent under a policy. Only the host's own agent takes it (the CLI
/// sends it there): another answers 409 with the address to ask.
pub(super) async fn host_shutdown(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath, body: Bytes) -> ApiResult<crate::views::ShutdownAsked> {
    let b: crate::views::ShutdownRequest = parse(&body, "shutdown request")?;
    if name != a.cfg.name {
        let addr = a.consensus.with_state(|s| s.host_by_name(&name).map(|h| h.api_addr.clone()));
        return Err(match addr {
            Some(addr) => ApiError::new(StatusCode::CONFLICT, format!("this is {}'s agent: ask {name}'s own agent, at {addr}", a.cfg.name)),
            None => ApiError::new(StatusCode::NOT_FOUND, format!("unknown host '{name}'")),
        });
    }
    let policy = b.policy.unwrap_or_else(|| a.default_stop_policy());
    a.request_stop(policy);
    Ok(Json(crate::views::ShutdownAsked { host: name, policy }))
}
