//! Planned operations as faults: a live migration with a fault at a random instant of it, and
//! a host's maintenance cycle. The simulated hypervisor (`hypervisor::SimDriver`) judges every start
//! and resume; these add the checks that a migration no fault touched completes and that a host
//! in maintenance lets its movable VMs go.

use super::*;

impl Sim {
    /// A live migration of a running VM between two up hosts, with one fault drawn for a random
    /// instant of it (or none). Whatever happens, the driver's checks catch two running copies
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
        let variant = self.rand(6);
        let delay = Duration::from_millis(self.rand(900));
        let leader = self.leader().await;
        let what = ["none", "cancel", "source power loss", "destination power loss", "link cut", "leader power loss"][variant as usize];
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
                    self.recoveries.owe(now, format!("{kind} ({what}) of h{victim}"), &before, &[]);
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
    /// take must leave (live), and come back afterwards; the invariants hold throughout.
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
        self.run_for(Duration::from_secs(6)).await;
    }
}
