//! The coordinator loop, on the leader only: fails over dead or fenced hosts once their fence
//! deadline has passed, releases held restart groups, retries best-effort VMs waiting for
//! capacity and places VMs that wait for a host. Which hosts may be failed over, and why, is
//! decided by `tandem_core::coordinate` (sans I/O).

use super::{lock, Agent, LOCAL_QUERY_TIMEOUT};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tandem_core::coordinate::{FailoverCandidate, FailoverInputs, FailoverReason, FenceReports, OwnFence};
use tandem_core::liveness::{Assessment, HostLiveness};
use tandem_core::recovery;
use tandem_core::state::{Applied, Command, BEST_EFFORT_RETRIES, BEST_EFFORT_RETRY_INTERVAL_MS};
use tandem_core::{HostId, HostSet, Millis};
use tracing::Instrument;

/// What the coordinator keeps between passes.
#[derive(Default)]
pub(super) struct Coordination {
    /// The restart group being held back, and since when.
    group_gate: Option<recovery::GroupGate>,
    /// When each best-effort VM waiting for capacity is due for its next retry.
    capacity_retry_due: BTreeMap<String, Millis>,
    /// When it first saw each host report itself fenced in an epoch.
    fence_reports: FenceReports,
    /// The last reason recorded for each VM that no host takes.
    waiting_reasons: BTreeMap<String, String>,
    /// The last reason recorded for each VM that cannot leave its host in maintenance.
    pub(super) stuck_in_maintenance: BTreeMap<String, String>,
    /// The evacuations this coordinator started, and how many of each VM's failed.
    pub(super) evacuation_attempts: tandem_core::evacuation::EvacuationAttempts,
    /// When it first saw each host left with parked VMs that have a hold.
    parked_holds: tandem_core::parking::ParkedHolds,
}

impl Agent {
    pub(super) async fn coordinator_loop(self: Arc<Self>) {
        let mut rounds = self.rounds();
        while !self.stopping.load(Ordering::SeqCst) {
            tokio::select! {
                () = self.next_round(&mut rounds) => {}
                () = self.coordinator_wake.notified() => {}
            }
            // A fenced host that still leads consensus keeps coordinating: otherwise a leader that
            // lost a pairwise partition (it still reaches a majority, so nobody replaces it)
            // would leave its own VMs, and everyone else's, without a coordinator.
            let st = self.status();
            if !self.consensus.is_leader() || (st.joined_epoch.is_none() && st.fenced.is_none()) {
                continue;
            }
            let Some(a) = self.assessment() else { continue };
            self.fail_over_hosts(&a).await;
            self.place_waiting(&a).await;
            self.evacuate_and_return(&a).await;
            self.count_capacity_retries().await;
            self.release_restart_groups().await;
            self.release_parked().await;
        }
    }

    /// Lets the VMs parked with a host that left run elsewhere once their hold passed.
    async fn release_parked(&self) {
        let now = self.clock.now();
        // Taken out and put back, so the coordination lock is never held with the state's.
        let mut holds = std::mem::take(&mut lock(&self.coordination).parked_holds);
        let due = self.consensus.with_state(|s| holds.due(s, now));
        lock(&self.coordination).parked_holds = holds;
        for host in due {
            match self.submit(Command::ReleaseParked { host }).await {
                Ok(Ok(Applied::ParkedReleased { names, .. })) => self.events.record(
                    crate::events::EventKind::ParkedReleased,
                    None,
                    Some(&self.host_name(host)),
                    format!("{} did not come back in time: {} parked VM(s) may run elsewhere ({})", self.host_name(host), names.len(), names.join(", ")),
                ),
                Ok(other) => tracing::debug!("release of the VMs parked with {host}: {other:?}"),
                Err(e) => tracing::debug!("release of the VMs parked with {host} not committed: {e}"),
            }
        }
    }

    /// Best-effort VMs a failover left without a host are placed by `place_waiting` as soon as
    /// room appears; every [`BEST_EFFORT_RETRY_INTERVAL_MS`] without one counts a retry, and the
    /// last one stops them.
    pub(super) async fn count_capacity_retries(&self) {
        let now = self.clock.now();
        let waiting: Vec<String> = self
            .consensus
            .with_state(|s| s.vms.values().filter(|v| v.capacity_retries().is_some() && v.assignment().is_none()).map(|v| v.spec.name.clone()).collect());
        let due: Vec<String> = {
            let mut scratch = lock(&self.coordination);
            scratch.capacity_retry_due.retain(|n, _| waiting.contains(n));
            waiting
                .into_iter()
                .filter(|n| {
                    let at = *scratch.capacity_retry_due.entry(n.clone()).or_insert(now.plus(BEST_EFFORT_RETRY_INTERVAL_MS));
                    now >= at
                })
                .collect()
        };
        for name in due {
            lock(&self.coordination).capacity_retry_due.insert(name.clone(), now.plus(BEST_EFFORT_RETRY_INTERVAL_MS));
            match self.submit(Command::CapacityRetry { name: name.clone() }).await {
                Ok(Ok(Applied::StillWaiting { attempt, .. })) => {
                    self.events.record(
                        crate::events::EventKind::VmWaiting,
                        Some(&name),
                        None,
                        format!("{name}: still no host with room (retry {attempt} of {BEST_EFFORT_RETRIES})"),
                    );
                }
                Ok(Ok(Applied::GaveUpWaiting { .. })) => self.events.record(
                    crate::events::EventKind::VmLeftDown,
                    Some(&name),
                    None,
                    format!("{name} (best-effort) stopped: no host with room after {BEST_EFFORT_RETRIES} retries"),
                ),
                Ok(other) => tracing::debug!("capacity retry of {name}: {other:?}"),
                Err(e) => tracing::debug!("capacity retry of {name} not committed: {e}"),
            }
        }
    }

    /// Lets the lowest held restart group start once the lower groups run (asked of their
    /// hosts) or its delay has passed.
    pub(super) async fn release_restart_groups(&self) {
        // Only the hosts of the VMs the lowest held group waits for are asked, all at once, so
        // one slow host delays this loop (and failovers) by at most LOCAL_QUERY_TIMEOUT.
        let hosts: Option<Vec<(HostId, String)>> = self.consensus.with_state(|s| {
            let held = recovery::lowest_held_group(s)?;
            let hosts: BTreeSet<HostId> = held.waits_for.iter().map(|(_, h, _)| *h).collect();
            Some(hosts.into_iter().filter_map(|h| Some((h, s.hosts.get(&h)?.api_addr.clone()))).collect())
        });
        let Some(hosts) = hosts else {
            lock(&self.coordination).group_gate = None;
            return;
        };
        let mut running: BTreeSet<(String, u64)> = BTreeSet::new();
        let mut asks = tokio::task::JoinSet::new();
        for (host, addr) in hosts {
            if host == self.me {
                running.extend(self.driver.list().into_iter().filter(|v| v.exit.is_none()).map(|v| (v.name, v.generation)));
                continue;
            }
            let (rpc, token) = (Arc::clone(&self.rpc), self.token.clone());
            asks.spawn(async move { rpc.call(&addr, "/v1/local", Some(&token), None, LOCAL_QUERY_TIMEOUT).await }.in_current_span());
        }
        // A host that does not answer counts as running nothing: its group waits for the delay.
        while let Some(answer) = asks.join_next().await {
            let Ok(Ok(resp)) = answer else { continue };
            let Ok(local) = serde_json::from_slice::<crate::views::LocalView>(&resp.body) else { continue };
            running.extend(local.vms.into_iter().filter(|v| v.exit.is_none()).map(|v| (v.name, v.generation)));
        }
        let now = self.clock.now();
        let release = {
            let mut gate = lock(&self.coordination).group_gate;
            let r = self.consensus.with_state(|s| recovery::release_held(s, |n, g| running.contains(&(n.to_string(), g)), &mut gate, now));
            lock(&self.coordination).group_gate = gate;
            r
        };
        let Some(r) = release else { return };
        let count = r.names.len();
        match self.submit(Command::ReleaseHeld { names: r.names }).await {
            Ok(Ok(_)) => {
                let why = match r.reason {
                    recovery::GroupReleaseReason::LowerGroupsRunning => "the lower groups run".to_string(),
                    recovery::GroupReleaseReason::DelayPassed => "its delay passed".to_string(),
                };
                self.events.record(
                    crate::events::EventKind::RestartGroupReleased,
                    None,
                    None,
                    format!("restart group {} ({count} VM(s)) starts: {why}", r.group),
                );
            }
            Ok(Err(e)) => tracing::debug!("release of restart group {} refused: {e}", r.group),
            Err(e) => tracing::debug!("release of restart group {} not committed: {e}", r.group),
        }
    }

    /// Hosts that may receive VMs now: active in committed state and alive as seen from here.
    pub(super) fn eligible_hosts(&self, a: &Assessment) -> HostSet {
        self.consensus.with_state(|s| {
            s.active_hosts()
                .iter()
                .filter(|h| (*h == self.me && !self.is_fenced()) || a.peer(*h).is_some_and(|p| p.liveness == HostLiveness::Alive && p.fenced_epoch.is_none()))
                .collect()
        })
    }

    pub(super) async fn fail_over_hosts(&self, a: &Assessment) {
        let st = self.status();
        let snapshot = self.consensus.snapshot();
        let inputs = FailoverInputs {
            me: self.me,
            state: &snapshot.state,
            assessment: a,
            own_fence: st.fenced.map(|reason| OwnFence { reason, confirmed_at: st.fence_confirmed_at, promised_through: self.promised_through() }),
            kill_grace_ms: self.cfg.timings.kill_grace_ms,
            now: self.clock.now(),
            skip_fence_wait: self.mutation == Some(crate::io::Mutation::SkipFenceWait),
            deadline_early_ms: if self.mutation == Some(crate::io::Mutation::EarlyEvidence) { self.cfg.timings.self_fence_ms } else { 0 },
        };
        let candidates = lock(&self.coordination).fence_reports.failover_candidates(&inputs);
        for candidate in candidates {
            let FailoverCandidate { host, epoch, ref reason } = candidate;
            if !self.consensus.confirm_leader().await {
                return;
            }
            let why = self.failover_why(host, epoch, reason);
            let eligible = self.eligible_hosts(a);
            let plan = self.consensus.with_state(|s| recovery::plan_failover(s, host, eligible));
            let name = self.host_name(host);
            let decided = self.clock.now();
            self.events.record(
                crate::events::EventKind::FailoverDecided,
                None,
                Some(&name),
                format!("{why}; plan: {} placement(s), {} left down", plan.placements.len(), plan.left_down.len()),
            );
            match self.submit(Command::Failover { host, epoch, plan: plan.placements }).await {
                Ok(Ok(Applied::FailedOver { moved, left_down, .. })) => {
                    for (vm, target, generation) in &moved {
                        self.events.record(
                            crate::events::EventKind::VmReassigned,
                            Some(vm),
                            Some(&name),
                            format!("{vm} reassigned {name} -> {}, generation {generation}", self.host_name(*target)),
                        );
                    }
                    for vm in &left_down {
                        self.events.record(
                            crate::events::EventKind::VmLeftDown,
                            Some(vm),
                            Some(&name),
                            format!("{vm} not restarted: no capacity or protection does not allow it"),
                        );
                    }
                    let since_dead = a.peer(host).and_then(|p| p.dead_since).map(|d| self.clock.now().since(d));
                    self.metrics.failovers.fetch_add(1, Ordering::Relaxed);
                    self.metrics.vms_moved.fetch_add(moved.len() as u64, Ordering::Relaxed);
                    if let Some(ms) = since_dead {
                        self.metrics.failover_seconds.observe(ms as f64 / 1000.0);
                    }
                    let timing = since_dead.map_or_else(String::new, |ms| format!(", {:.2} s after it was first seen dead", ms as f64 / 1000.0));
                    let record = self.failover_record(a, &candidate, decided, &moved, left_down.clone());
                    self.events.record_failover(record, format!("{} VM(s) moved, {} left down{timing}", moved.len(), left_down.len()));
                }
                Ok(Ok(other)) => tracing::warn!("unexpected failover answer {other:?}"),
                Ok(Err(e)) => tracing::info!("failover of {name} refused: {e}"),
                Err(e) => tracing::warn!("failover of {name} not committed: {e}"),
            }
        }
    }

    /// The failover's phases for the timeline, on the wall clock.
    fn failover_record(
        &self,
        a: &Assessment,
        &FailoverCandidate { host, epoch, ref reason }: &FailoverCandidate,
        decided: Millis,
        moved: &[(String, HostId, u64)],
        left_down: Vec<String>,
    ) -> crate::events::FailoverRecord {
        let (now, wall_now) = (self.clock.now(), tandem_drivers::wall_ms());
        // A time on this host's clock, as wall-clock milliseconds.
        let wall = |t: Millis| wall_now.saturating_sub(now.since(t));
        let p = a.peer(host);
        crate::events::FailoverRecord {
            host: self.host_name(host),
            epoch,
            reason: match reason {
                FailoverReason::OwnFence(_) => "coordinator-fenced",
                FailoverReason::ReportedFenced => "reported-fenced",
                FailoverReason::Dead { .. } | FailoverReason::UnsafeSkippedFenceWait => "dead",
            }
            .to_string(),
            last_evidence_ms: p.and_then(|p| p.last_evidence).map(wall),
            declared_dead_ms: p.and_then(|p| p.dead_since).map(wall),
            fence_deadline_ms: p.and_then(|p| p.fence_deadline).map(wall),
            decided_ms: wall(decided),
            committed_ms: wall_now,
            moved: moved
                .iter()
                .map(|(vm, to, generation)| crate::events::MovedVm { vm: vm.clone(), to: self.host_name(*to), generation: *generation })
                .collect(),
            left_down,
        }
    }

    /// The timeline's words for why `host` is failed over.
    fn failover_why(&self, host: HostId, epoch: u64, reason: &FailoverReason) -> String {
        let name = self.host_name(host);
        match reason {
            FailoverReason::OwnFence(r) => format!("{name} (the coordinator) fenced itself: {r}"),
            FailoverReason::ReportedFenced => format!("{name} reports itself fenced in epoch {epoch}"),
            FailoverReason::UnsafeSkippedFenceWait => format!("UNSAFE: {name} not heard; fence deadline skipped"),
            FailoverReason::Dead { net_age_ms, disk_age_ms, past_deadline_ms } => format!(
                "{name} dead: no network heartbeat for {:.1} s, no disk heartbeat for {:.1} s; fence deadline passed {:.1} s ago",
                *net_age_ms as f64 / 1000.0,
                *disk_age_ms as f64 / 1000.0,
                *past_deadline_ms as f64 / 1000.0
            ),
        }
    }

    pub(super) async fn place_waiting(&self, a: &Assessment) {
        let waiting = self.consensus.with_state(|s| s.unplaced());
        if waiting.is_empty() {
            lock(&self.coordination).waiting_reasons.clear();
            return;
        }
        let eligible = self.eligible_hosts(a);
        let plan = self.consensus.with_state(|s| recovery::place(s, &waiting, eligible, true));
        // Say once, in the timeline, why a VM finds no host (and again when the reason changes).
        let reasons: Vec<(String, String)> =
            self.consensus.with_state(|s| plan.left_down.iter().filter_map(|(vm, _)| Some((vm.clone(), recovery::waiting_reason(s, vm, eligible)?))).collect());
        for (vm, why) in reasons {
            let changed = lock(&self.coordination).waiting_reasons.insert(vm.clone(), why.clone()).as_ref() != Some(&why);
            if changed {
                self.events.record(crate::events::EventKind::VmWaiting, Some(&vm), None, format!("{vm} waits for a host: {why}"));
            }
        }
        lock(&self.coordination).waiting_reasons.retain(|vm, _| waiting.contains(vm));
        for (vm, host) in plan.placements {
            match self.submit(Command::Assign { name: vm.clone(), host }).await {
                Ok(Ok(Applied::Assigned { generation, .. })) => self.events.record(
                    crate::events::EventKind::VmAssigned,
                    Some(&vm),
                    Some(&self.host_name(host)),
                    format!("{vm} placed on {}, generation {generation}", self.host_name(host)),
                ),
                Ok(other) => tracing::debug!("assign of {vm} refused: {other:?}"),
                Err(e) => tracing::debug!("assign of {vm} failed: {e}"),
            }
        }
    }
}
