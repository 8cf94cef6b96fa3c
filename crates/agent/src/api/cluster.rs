//! The cluster as a whole: this agent's status and identity, init, FTT, what-if plans, settings and placement rules.

use super::*;

pub(super) async fn status(State(a): State<Arc<Agent>>) -> Json<StatusView> {
    Json(StatusView {
        host: a.cfg.name.clone(),
        host_id: a.me.0,
        incarnation: a.incarnation,
        driver: a.driver.kind().to_string(),
        runtime: a.status(),
        consensus: a.consensus.status(),
        rejected: a.reject_counters(),
    })
}

/// What a host tells a cluster that adds it.
pub(super) async fn identity(State(a): State<Arc<Agent>>) -> Json<Identity> {
    Json(Identity {
        host_id: a.me.0,
        name: a.cfg.name.clone(),
        api_addr: a.cfg.api_addr.to_string(),
        heartbeat_addr: a.cfg.heartbeat_addr.to_string(),
        capacity: a.cfg.capacity(),
    })
}

pub(super) async fn cluster_init(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<Initialized> {
    empty_body(&body)?;
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
    Ok(Json(Initialized { initialized: true, host: id.name }))
}

pub(super) async fn ftt(State(a): State<Arc<Agent>>) -> ApiResult<FttView> {
    // A search on a snapshot, off the runtime: it holds up neither the log nor other requests.
    let snap = a.consensus.snapshot();
    // The target from the same snapshot the search runs on.
    let (target, survive_site_loss) = (snap.state.settings.ftt_target, snap.state.settings.survive_site_loss);
    let (report, sites) = a
        .heavy
        .run(move || {
            let s = &snap.state;
            let name = |h: &HostId| s.host_name(*h);
            let sites = s
                .site_losses()
                .into_iter()
                .map(|l| SiteLossView {
                    survived: l.survived(),
                    hosts: l.hosts.iter().map(name).collect(),
                    quorum: l.quorum,
                    protected_down: l.protected_down.into_iter().map(|(vm, reason)| StaysDown { vm, reason }).collect(),
                    site: l.site,
                })
                .collect();
            (s.ftt(), sites)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(Json(FttView { report, target, sites, survive_site_loss }))
}

#[derive(Deserialize)]
pub(super) struct PlanQuery {
    /// Comma-separated host names; absent: every single-host failure.
    fail: Option<String>,
    /// A site: all its hosts fail together (not with `fail`).
    fail_site: Option<String>,
}

/// What would happen if hosts failed: for each failure set, where every VM restarts and which
/// stay down, by the same planner the coordinator runs.
pub(super) async fn plan(State(a): State<Arc<Agent>>, ApiQuery(q): ApiQuery<PlanQuery>) -> ApiResult<Vec<FailurePlan>> {
    // Planned on a snapshot, off the runtime (every host's failure on a large state is heavy).
    let snap = a.consensus.snapshot();
    a.heavy.run(move || what_if(&snap.state, q.fail.as_deref(), q.fail_site.as_deref())).await.map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))?
}

pub(super) fn what_if(s: &tandem_core::state::ClusterState, fail: Option<&str>, fail_site: Option<&str>) -> ApiResult<Vec<FailurePlan>> {
    {
        let sets: Vec<Vec<HostId>> = match (fail, fail_site) {
            (Some(_), Some(_)) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "fail= and fail_site= do not go together")),
            (None, Some(site)) => {
                let hosts =
                    s.sites().remove(site).ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, format!("fail_site= names a site no host is in: '{site}'")))?;
                vec![hosts]
            }
            (Some(list), None) => {
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
            (None, None) => s.active_hosts().iter().map(|h| vec![h]).collect(),
        };
        let name = |h: HostId| s.host_name(h);
        let out: Vec<FailurePlan> = sets
            .iter()
            .map(|set| {
                let (p, quorum) = tandem_core::recovery::plan_what_if(s, set);
                let members = s.members().len();
                FailurePlan {
                    failed: set.iter().map(|h| name(*h)).collect(),
                    quorum,
                    note: (!quorum).then(|| {
                        format!(
                            "no quorum: {} of {members} voting hosts would be left and a majority ({}) is needed, so nothing restarts",
                            members - set.len().min(members),
                            members / 2 + 1
                        )
                    }),
                    restarts: p.placements.iter().map(|(vm, h)| PlannedRestart { vm: vm.clone(), host: name(*h) }).collect(),
                    left_down: p.left_down.iter().map(|(vm, why)| StaysDown { vm: vm.clone(), reason: *why }).collect(),
                }
            })
            .collect();
        Ok(Json(out))
    }
}

pub(super) async fn settings_show(State(a): State<Arc<Agent>>) -> Json<Settings> {
    Json(a.consensus.with_state(|s| s.settings.clone()))
}

pub(super) async fn settings_set(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<SettingsSet> {
    let b: SettingsRequest = parse(&body, "settings")?;
    let mut settings = a.consensus.with_state(|s| s.settings.clone());
    if let Some(t) = b.ftt_target {
        settings.ftt_target = t;
    }
    if let Some(p) = b.vcpu_overcommit_pct {
        settings.vcpu_overcommit_pct = p;
    }
    if let Some(p) = b.shutdown_policy {
        settings.shutdown_policy = p;
    }
    if let Some(t) = b.survive_site_loss {
        settings.survive_site_loss = t;
    }
    if let Some(site) = b.preferred_site {
        // A name no host carries would prefer nobody, silently: refused here (committed state
        // keeps a preference whose site later empties, which then prefers nobody).
        if let Some(s) = site.as_deref().filter(|s| !a.consensus.with_state(|st| st.sites().contains_key(*s))) {
            let known = a.consensus.with_state(|st| st.sites().into_keys().collect::<Vec<_>>().join(", "));
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("no host is at site '{s}' (sites: {})", if known.is_empty() { "none" } else { &known }),
            ));
        }
        settings.preferred_site = site;
    }
    for (group, delay) in b.group_delays_ms {
        match delay {
            Some(d) => settings.group_delays_ms.insert(group, d),
            None => settings.group_delays_ms.remove(&group),
        };
    }
    let admission = admitted(&a, Command::SetSettings { settings: settings.clone(), force: b.force }, None).await?;
    Ok(Json(SettingsSet { settings, admission }))
}

pub(super) async fn rules(State(a): State<Arc<Agent>>) -> Json<Vec<Rule>> {
    Json(a.consensus.with_state(|s| s.rules.values().cloned().collect()))
}

pub(super) async fn rule_set(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<RuleAdded> {
    let b: RuleRequest = parse_strict(&body, "rule")?;
    let admission = admitted(&a, Command::SetRule { rule: b.rule(), force: b.force }, None).await?;
    Ok(Json(RuleAdded { rule: b.name, admission }))
}

pub(super) async fn rule_delete(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Deleted> {
    submit(&a, Command::DeleteRule { name: name.clone() }).await?;
    Ok(Json(Deleted { deleted: name }))
}
