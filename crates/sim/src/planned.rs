//! Planned operations as faults: a live migration with a fault at a random instant of it, a
//! host's maintenance cycle, and a host's planned stop under each stop policy. The simulated hypervisor (`hypervisor::SimDriver`) judges every start
//! and resume; these add the checks that a migration no fault touched completes and that a host
//! in maintenance lets its movable VMs go.

use super::*;

impl Sim {
    /// A live migration of a running VM between two up hosts (of one site or two), with one fault
    /// drawn for a random instant of it (or none). Whatever happens, the driver's checks catch two running copies
    /// and a resume from stale memory; without a fault the migration must complete.
    pub(super) async fn live_migration(&mut self, kind: FaultKind, now: u64, until: u64, hold: Duration) {
        let w = Arc::clone(&self.world);
        let up = self.up();
        let mut candidates = vec![];
        for h in &up {
            for vm in self.vms_on(*h).await {
                candidates.push((vm, *h));
            }
        }
        let Some((vm, from)) = candidates.get(self.rand(candidates.len().max(1) as u64) as usize).cloned() else {
            w.log(format!("FAULT {kind}: no running VM to migrate"));
            return;
        };
        let others: Vec<u32> = up.iter().copied().filter(|h| *h != from).collect();
        let Some(to) = others.get(self.rand(others.len().max(1) as u64) as usize).copied() else { return };
        // With sites, the source's site storage may also fail under the move (its mirrored
        // disks switch to another site's copy meanwhile, which may be the destination's).
        let source_site = self.site_of(from).map(|(site, _)| site);
        let variant = self.rand(if source_site.is_some() { 7 } else { 6 });
        // The source's storage fails early enough for its disks to switch while memory moves.
        let delay = Duration::from_millis(self.rand(if variant == 6 { 200 } else { 900 }));
        let leader = self.leader().await;
        let what =
            ["none", "cancel", "source power loss", "destination power loss", "link cut", "leader power loss", "source site storage loss"][variant as usize];
        w.log(format!("FAULT {kind}: {vm} from h{from} to h{to}; then {what} after {delay:?}"));
        let req = tandem_agent::views::MigrateRequest { to: Some(format!("h{to}")), force: true };
        let r = self.send(from, "POST", &format!("/v1/vms/{vm}/migrate"), &req).await;
        w.log(format!("operator: migrate {vm} to h{to} -> {:?}", r.as_ref().map(|r| r.0)));
        let started = matches!(r, Some((200, _)));
        self.run_for(delay).await;
        match variant {
            1 => {
                let r = self.api(from, "DELETE", &format!("/v1/vms/{vm}/migrate"), None).await;
                w.log(format!("operator: cancel the migration of {vm} -> {:?}", r.map(|r| r.0)));
            }
            2 | 3 | 5 => {
                let victim = match variant {
                    2 => from,
                    3 => to,
                    _ => leader.unwrap_or(from),
                };
                let before = self.vms_on(victim).await;
                self.excuse(&[victim], until);
                self.power_off(victim).await;
                if !before.is_empty() {
                    self.recoveries.owe(now, format!("{kind} ({what}) of h{victim}"), &self.restartable(&before), &[]);
                }
                self.run_for(hold).await;
                self.boot(victim).await;
            }
            4 => {
                {
                    let mut c = lock(&w.cond);
                    c.blocked.insert((from, to));
                    c.blocked.insert((to, from));
                }
                // As for a pair partition: one of the two may lose its partition verdict.
                self.excuse(&[from, to], until);
                self.run_for(hold).await;
                lock(&w.cond).blocked.clear();
                w.log(format!("HEAL {kind}: link h{from}-h{to}"));
            }
            6 => {
                let site = source_site.unwrap_or_default();
                lock(&w.storage_down).insert(site.clone());
                self.run_for(hold).await;
                lock(&w.storage_down).remove(&site);
                w.log(format!("HEAL {kind}: site {site}'s storage"));
            }
            _ => {}
        }
        self.run_for(Duration::from_secs(4)).await;
        if variant == 0 && started {
            let on_to = self.vms_on(to).await.contains(&vm);
            if !on_to {
                let detail = format!("{vm}'s migration from h{from} to h{to}, which no fault touched, did not complete within 4 s");
                w.violation(oracle::Violation::new(Invariant::MigrationStuck, detail));
            }
        }
    }

    /// Host `target` enters maintenance for a while and leaves it: its VMs that another host may
    /// take must leave (live), and come back afterwards — in half the draws the first move back
    /// of each is cancelled, and it must come back all the same; the invariants hold throughout.
    pub(super) async fn maintenance_cycle(&mut self, kind: FaultKind, target: u32) {
        let w = Arc::clone(&self.world);
        if !self.up().contains(&target) {
            return;
        }
        let host = format!("h{target}");
        let before = self.vms_on(target).await;
        let req = tandem_agent::views::HostModeRequest { mode: tandem_core::state::HostMode::Maintenance, force: true };
        let r = self.send(target, "POST", &format!("/v1/hosts/{host}/mode"), &req).await;
        w.log(format!("FAULT {kind}: {host} enters maintenance with {} VM(s) -> {:?}", before.len(), r.as_ref().map(|r| r.0)));
        self.run_for(Duration::from_secs(8)).await;
        let left = self.vms_on(target).await;
        let plan = self.api(target, "GET", &format!("/v1/hosts/{host}/evacuation"), None).await;
        let movable = plan
            .and_then(|(_, v)| serde_json::from_value::<tandem_agent::views::EvacuationPlan>(v).ok())
            .map_or(0, |p| p.steps.iter().filter(|s| s.to.is_some() && left.contains(&s.vm)).count());
        if matches!(r, Some((200, _))) && movable > 0 && left.len() >= before.len() && !before.is_empty() {
            let detail = format!("{host} in maintenance for 8 s still runs {left:?}, {movable} of which another host may take");
            w.violation(oracle::Violation::new(Invariant::MigrationStuck, detail));
        }
        let req = tandem_agent::views::HostModeRequest { mode: tandem_core::state::HostMode::Normal, force: true };
        let r = self.send(target, "POST", &format!("/v1/hosts/{host}/mode"), &req).await;
        w.log(format!("HEAL {kind}: {host} leaves maintenance -> {:?}", r.as_ref().map(|r| r.0)));
        let evacuated: Vec<String> = before.iter().filter(|vm| !left.contains(*vm)).cloned().collect();
        if self.rand(2) == 1 {
            self.cancel_moves_back(target, &evacuated).await;
        }
        self.run_for(Duration::from_secs(8)).await;
        let back = self.vms_on(target).await;
        let running: Vec<String> = self.committed_vms().await.unwrap_or_default().into_iter().filter(|v| v.should_run_on().is_some()).map(|v| v.name).collect();
        let away: Vec<&String> = evacuated.iter().filter(|vm| running.contains(*vm) && !back.contains(*vm)).collect();
        if matches!(r, Some((200, _))) && !away.is_empty() {
            let detail = format!("{host} left maintenance 8 s ago (its first moves back perhaps cancelled) and {away:?} are still away");
            w.violation(oracle::Violation::new(Invariant::MigrationStuck, detail));
        }
    }

    /// Cancels the first move back to `target` of each VM of `evacuated`, watching for 3 s.
    async fn cancel_moves_back(&mut self, target: u32, evacuated: &[String]) {
        let host = format!("h{target}");
        let mut cancelled = std::collections::BTreeSet::new();
        for _ in 0..150 {
            let vms = self.committed_vms().await.unwrap_or_default();
            for v in vms.iter().filter(|v| evacuated.contains(&v.name) && v.migrating_to.as_deref() == Some(host.as_str())) {
                if cancelled.insert(v.name.clone()) {
                    let r = self.api(target, "DELETE", &format!("/v1/vms/{}/migrate", v.name), None).await;
                    self.world.log(format!("operator: cancel {}'s move back to {host} -> {:?}", v.name, r.map(|r| r.0)));
                }
            }
            if cancelled.len() == evacuated.len() {
                return;
            }
            self.run_for(Duration::from_millis(20)).await;
        }
    }

    /// Host `target` is stopped as systemd stops it, under a drawn policy, stays down a while and
    /// starts again. `kill` and `migrate`: its VMs must run again elsewhere (a recovery is owed).
    /// `shutdown` and `freeze`, once the host has left: its VMs are parked — under `freeze` none
    /// may run anywhere until it is back (`parked-ran`), under `shutdown` they must run elsewhere
    /// once the hold passed — and under both they must run again once it is back. A stop that
    /// could not commit its leave falls back to `kill`, and is judged as one.
    pub(super) async fn planned_stop(&mut self, kind: FaultKind, now: u64, until: u64, target: u32) {
        use tandem_agent::agent::ShutdownPolicy;
        let w = Arc::clone(&self.world);
        if !self.up().contains(&target) {
            return;
        }
        let Some(agent) = self.hosts[target as usize].agent.clone() else { return };
        let policy = [ShutdownPolicy::Shutdown, ShutdownPolicy::Freeze, ShutdownPolicy::Kill, ShutdownPolicy::Migrate][self.rand(4) as usize];
        let before = self.vms_on(target).await;
        w.log(format!("FAULT {kind}: h{target} stops (policy {}) with {} VM(s)", tandem_agent::agent::policy_name(policy), before.len()));
        // The stopping host fences itself under kill and migrate: that is the fault's doing.
        self.excuse(&[target], until);
        agent.stop_with(Some(policy)).await;
        // A `migrate` stop may wait out its evacuation bound: what is owed counts from its end.
        let now = w.now_ms().max(now);
        self.excuse(&[target], now + (until - now.min(until)).max(5_000));
        // The stopping host's own state: a leave it committed is applied there before it stops.
        let me = tandem_core::HostId(target);
        let left = agent.consensus.with_state(|s| s.hosts.get(&me).is_some_and(|h| h.status == tandem_core::state::HostStatus::Left));
        drop(agent);
        self.power_off(target).await;
        let parked: Vec<String> = before.iter().filter(|vm| self.created.contains(*vm)).cloned().collect();
        w.log(format!("h{target} stopped ({}); parked: {}", if left { "left" } else { "not left" }, if left { parked.len() } else { 0 }));
        let away = Duration::from_secs(SIM_PARK_HOLD_S + 5);
        match (left, policy) {
            (true, ShutdownPolicy::Freeze) => {
                let end = w.now_ms() + away.as_millis() as u64;
                while w.now_ms() < end {
                    self.run_for(Duration::from_millis(250)).await;
                    let running = self.running();
                    for vm in parked.iter().filter(|vm| running.get(*vm).is_some_and(|on| !on.is_empty())) {
                        let detail = format!("{vm}, parked with h{target} (freeze), runs on {:?} before h{target} returned", running.get(vm));
                        w.violation(oracle::Violation::new(Invariant::ParkedRan, detail));
                    }
                }
            }
            (true, _) => {
                // shutdown: released after the hold, then placed like any waiting VM.
                self.recoveries.owe(now, format!("{kind} (shutdown, hold {SIM_PARK_HOLD_S} s) of h{target}"), &self.restartable(&parked), &[]);
                self.run_for(away).await;
            }
            (false, _) => {
                self.recoveries.owe(now, format!("{kind} ({}) of h{target}", tandem_agent::agent::policy_name(policy)), &self.restartable(&before), &[]);
                self.run_for(away).await;
            }
        }
        self.boot(target).await;
        // Its own fence (kill, migrate) is read from its timeline once it is back.
        let back = w.now_ms();
        self.excuse(&[target], back + 5_000);
        if left && policy == ShutdownPolicy::Freeze {
            // Back: its parked VMs start on it again.
            self.recoveries.owe(back, format!("{kind} (freeze) of h{target}: back"), &parked, &[]);
        }
        self.run_for(Duration::from_secs(4)).await;
    }
}
