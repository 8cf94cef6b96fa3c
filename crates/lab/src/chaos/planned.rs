//! The suite's planned-operation faults: a live migration with a fault at a random instant of
//! its copy (nothing, power loss of the source or of the destination, the pair cut), a
//! maintenance cycle (evacuated live, then back), and a host's planned stop under each shutdown
//! policy. Live migration keeps a paused copy at the
//! destination while the source runs, so the suite's process recorder asks the hosts which
//! copies are paused before it counts a double run ([`paused_copies_judge`]).

use super::{signal, Suite};
use crate::lab::{DoubleJudge, Lab};
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem::client::Client;
use tandem_agent::views::{HostModeRequest, LocalView, MigrateRequest, ShutdownRequest};
use tandem_core::state::{HostMode, ShutdownPolicy};
use tandem_sim::oracle::{Invariant, Violation};

/// How long a pair cut during a migration lasts: past the peer timeout, so one side fences.
const PAIR_CUT: Duration = Duration::from_secs(5);
/// The longest a planned stop may take until its agent exits.
const STOP_BOUND: Duration = Duration::from_secs(90);
/// How long VMs parked by a planned stop are watched for not running while their host is away.
const PARKED_WATCH: Duration = Duration::from_secs(4);
/// How long a host in maintenance may take to see its VMs leave, and they to come back after it.
const EVACUATION_BOUND: Duration = Duration::from_secs(60);

/// How long a host's last answer about a VM stands in for it once the host stops answering:
/// a power loss kills a destination's paused copy a few milliseconds after its agent, and the
/// sample that still sees that copy finds nobody to ask.
const LAST_ANSWER_STANDS: Duration = Duration::from_millis(100);

/// A judge for the recorder: a VM whose processes are on several hosts is explained when,
/// asking those hosts one after the other and then again in reverse order, at most one runs it
/// unpaused in either sweep (a switchover between two answers shows in one sweep only; two
/// copies running together show in both). A host that does not answer counts by its answer of
/// the last [`LAST_ANSWER_STANDS`], else as running it: doubt leaves a double run standing.
pub(crate) fn paused_copies_judge(lab: &Lab) -> DoubleJudge {
    let clients: Vec<(String, Client)> = lab
        .hosts
        .iter()
        .map(|h| (h.name.clone(), Client { addr: h.api.clone(), timeout: Duration::from_millis(500), token: Some(lab.token()), tls: None }))
        .collect();
    // (host, VM) → when it last answered, and whether it ran the VM unpaused then.
    let last: Mutex<BTreeMap<(String, String), (Instant, bool)>> = Mutex::default();
    Arc::new(move |vm: &str, hosts: &BTreeSet<String>| {
        let asked: Vec<&(String, Client)> = clients.iter().filter(|(name, _)| hosts.contains(name)).collect();
        let unpaused_on = |(name, client): &(String, Client)| -> bool {
            let mut last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (name.clone(), vm.to_string());
            match client.get_as::<LocalView>("/v1/local") {
                Ok(local) => {
                    let running = local.vms.iter().any(|v| v.name == vm && v.exit.is_none() && !v.paused);
                    last.insert(key, (Instant::now(), running));
                    running
                }
                Err(_) => last.get(&key).filter(|(at, _)| at.elapsed() <= LAST_ANSWER_STANDS).is_none_or(|(_, running)| *running),
            }
        };
        let forward = asked.iter().filter(|h| unpaused_on(h)).count();
        let backward = asked.iter().rev().filter(|h| unpaused_on(h)).count();
        asked.len() == hosts.len() && (forward <= 1 || backward <= 1)
    })
}

/// What happens to a migration in flight.
#[derive(Clone, Copy, Debug)]
enum MigrationFault {
    Nothing,
    SourcePowerLoss,
    DestinationPowerLoss,
    PairCut,
}

impl Suite {
    /// A VM of `source` migrates to another host; 0–400 ms in, one of [`MigrationFault`].
    pub(super) fn inject_live_migration(&mut self, source: usize, t0: Instant, may_fence: &mut Vec<usize>) -> Result<()> {
        let n = self.lab.hosts.len();
        let vms = self.vms_on(&[source]);
        let Some(vm) = vms.get(self.rng.below(vms.len().max(1) as u64) as usize).cloned() else {
            self.log("live-migration: no VM to move");
            return Ok(());
        };
        let dest = (source + 1 + self.rng.below(n as u64 - 1) as usize) % n;
        let (src_name, dst_name) = (self.lab.hosts[source].name.clone(), self.lab.hosts[dest].name.clone());
        let fault = [MigrationFault::Nothing, MigrationFault::SourcePowerLoss, MigrationFault::DestinationPowerLoss, MigrationFault::PairCut]
            [self.rng.below(4) as usize];
        let delay = Duration::from_millis(self.rng.below(400));
        self.log(&format!("live-migration: {vm} {src_name} → {dst_name}, then {fault:?} after {} ms", delay.as_millis()));
        let asked = self.client(source).send("POST", &format!("/v1/vms/{vm}/migrate"), &MigrateRequest { to: Some(dst_name.clone()), force: true });
        if let Err(e) = asked {
            // Refused (the destination full, a rule): nothing moves; the fault still lands.
            self.log(&format!("  migration refused: {e}"));
        }
        std::thread::sleep(delay);
        match fault {
            MigrationFault::Nothing => std::thread::sleep(Duration::from_secs(2)),
            MigrationFault::SourcePowerLoss => self.lose_power_and_recover(source, t0, "back on the survivors", may_fence)?,
            MigrationFault::DestinationPowerLoss => self.lose_power_and_recover(dest, t0, "of the destination back on the survivors", may_fence)?,
            MigrationFault::PairCut => {
                let (a, b) = (source.min(dest), source.max(dest));
                self.net.block_pair(a, b)?;
                may_fence.extend([a, b]);
                std::thread::sleep(PAIR_CUT);
                self.net.unblock(a)?;
            }
        }
        Ok(())
    }

    /// Cuts `host`'s power in a migration, waits for its VMs to run elsewhere, boots it again.
    fn lose_power_and_recover(&mut self, host: usize, t0: Instant, what: &str, may_fence: &mut Vec<usize>) -> Result<()> {
        let name = self.lab.hosts[host].name.clone();
        let vms = self.vms_on(&[host]);
        self.lab.power_off(host);
        may_fence.push(host);
        let took = self.wait_moved("live-migration", &vms, std::slice::from_ref(&name), t0);
        self.record_recovery(&vms, took, what);
        std::thread::sleep(Duration::from_secs(1));
        self.lab.start(host)
    }

    /// `target` stops as planned under a policy drawn at random; it comes back a few seconds
    /// after its agent exits. Parked VMs must not run anywhere while it is away; the others
    /// must run again elsewhere (the kill policy) or have left live (the migrate policy).
    pub(super) fn inject_planned_stop(&mut self, target: usize, t0: Instant, may_fence: &mut Vec<usize>) -> Result<()> {
        let policy = [ShutdownPolicy::Kill, ShutdownPolicy::Migrate, ShutdownPolicy::Shutdown, ShutdownPolicy::Freeze][self.rng.below(4) as usize];
        let name = self.lab.hosts[target].name.clone();
        let vms = self.vms_on(&[target]);
        self.log(&format!("planned-stop: {name} ({} VM(s)), policy {policy:?}", vms.len()));
        self.client(target).send("POST", &format!("/v1/hosts/{name}/shutdown"), &ShutdownRequest { policy: Some(policy) })?;
        // The stop fences the host on its way out (its lease must not outlive its agent).
        may_fence.push(target);
        let mut exited = false;
        while t0.elapsed() < STOP_BOUND {
            if self.lab.reap(target) {
                exited = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !exited {
            self.violation(Violation::new(Invariant::NotRecovered, format!("planned-stop: {name}'s agent did not exit within {STOP_BOUND:?}")));
            if let Some(agent) = self.lab.agent_pid(target) {
                signal(agent, libc::SIGKILL);
            }
        }
        self.log(&format!("  {name}'s agent exited {:.2} s after the request", t0.elapsed().as_secs_f64()));
        if policy.parks() {
            let watch = Instant::now();
            while watch.elapsed() < PARKED_WATCH {
                let running = self.running_now();
                if let Some(vm) = vms.iter().find(|vm| running.contains_key(*vm)) {
                    let detail = format!("planned-stop ({policy:?}): {vm} ran while its host {name} was away");
                    self.violation(Violation::new(Invariant::ParkedRan, detail));
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            let took = self.wait_moved("planned-stop", &vms, std::slice::from_ref(&name), t0);
            self.record_recovery(&vms, took, "running elsewhere");
        }
        self.lab.start(target)?;
        // Quiet before the next fault: VMs parked with the host start on it again, and those a
        // `migrate` stop evacuated come back home — moves a next fault must not take for its
        // own (the suite once saw them during `message-loss` and called them a fencing).
        if (policy.parks() || policy == ShutdownPolicy::Migrate) && !vms.is_empty() {
            let t = Instant::now();
            let home =
                |running: &tandem_sim::oracle::Running| vms.iter().all(|vm| running.get(vm).is_some_and(|hosts| hosts.len() == 1 && hosts.contains(&name)));
            match self.wait_for(EVACUATION_BOUND, home) {
                true => self.log(&format!("  back on {name} {:.2} s after its start", t.elapsed().as_secs_f64())),
                false => self.log(&format!("  not all back on {name} within {EVACUATION_BOUND:?} (released elsewhere?)")),
            }
        }
        Ok(())
    }

    /// `target` enters maintenance: every VM on it must leave live and nobody fences; then it
    /// leaves maintenance and the VMs that left must come back (their home is remembered) — in
    /// half the draws after the operator cancelled the first move back of each that it caught
    /// under way (a failed move back keeps the home and is tried again).
    pub(super) fn inject_maintenance_cycle(&mut self, target: usize) -> Result<()> {
        let name = self.lab.hosts[target].name.clone();
        let vms = self.vms_on(&[target]);
        self.log(&format!("maintenance-cycle: {name} ({} VM(s)) enters maintenance", vms.len()));
        let mode = |mode| HostModeRequest { mode, force: true };
        self.client(target).send("POST", &format!("/v1/hosts/{name}/mode"), &mode(HostMode::Maintenance))?;
        let t = Instant::now();
        let left = self.wait_for(EVACUATION_BOUND, |running| vms.iter().all(|vm| running.get(vm).is_none_or(|hosts| !hosts.contains(&name))));
        match left {
            true => self.log(&format!("  its VMs left in {:.2} s", t.elapsed().as_secs_f64())),
            false => self.violation(Violation::new(Invariant::MigrationStuck, format!("maintenance-cycle: VMs still on {name} after {EVACUATION_BOUND:?}"))),
        }
        self.client(target).send("POST", &format!("/v1/hosts/{name}/mode"), &mode(HostMode::Normal))?;
        let t = Instant::now();
        if self.rng.below(2) == 1 {
            self.cancel_moves_back(target, &vms);
        }
        let back =
            self.wait_for(EVACUATION_BOUND, |running| vms.iter().all(|vm| running.get(vm).is_some_and(|hosts| hosts.len() == 1 && hosts.contains(&name))));
        match back {
            true => self.log(&format!("  back on {name} in {:.2} s", t.elapsed().as_secs_f64())),
            false => {
                let where_they_are = self.not_back(target, &vms);
                self.violation(Violation::new(
                    Invariant::MigrationStuck,
                    format!("maintenance-cycle: VMs not back on {name} {EVACUATION_BOUND:?} after it left maintenance: {where_they_are}"),
                ))
            }
        }
        Ok(())
    }

    /// Where the VMs of `vms` that are not back on `target` alone run, and what the cluster says
    /// of them (host, home, a migration under way, why one waits): the evidence a stuck return
    /// leaves in the chaos report.
    fn not_back(&self, target: usize, vms: &[String]) -> String {
        let name = &self.lab.hosts[target].name;
        let running = self.running_now();
        let listed: Vec<tandem_agent::views::VmView> = (0..self.lab.hosts.len()).find_map(|i| self.client(i).list_as("/v1/vms").ok()).unwrap_or_default();
        let mut out = vec![];
        for vm in vms {
            let hosts = running.get(vm).cloned().unwrap_or_default();
            if hosts.len() == 1 && hosts.contains(name) {
                continue;
            }
            let view = listed.iter().find(|v| v.name == *vm);
            out.push(format!(
                "{vm} running on {hosts:?}, placed on {:?}, home {:?}, migrating to {:?}, waiting {:?}",
                view.and_then(|v| v.host.clone()),
                view.and_then(|v| v.home.clone()),
                view.and_then(|v| v.migrating_to.clone()),
                view.and_then(|v| v.waiting.clone())
            ));
        }
        out.join("; ")
    }

    /// Cancels the first move back to `target` of each of `vms` seen under way within 3 s (one
    /// that completed before it was seen is not cancelled).
    fn cancel_moves_back(&mut self, target: usize, vms: &[String]) {
        let name = self.lab.hosts[target].name.clone();
        let mut cancelled: Vec<String> = vec![];
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) && cancelled.len() < vms.len() && !super::interrupted() {
            let listed: Vec<tandem_agent::views::VmView> = self.client(target).list_as("/v1/vms").unwrap_or_default();
            let moving: Vec<String> = listed
                .into_iter()
                .filter(|v| vms.contains(&v.name) && v.migrating_to.as_deref() == Some(name.as_str()) && !cancelled.contains(&v.name))
                .map(|v| v.name)
                .collect();
            for vm in moving {
                let r = self.client(target).send("DELETE", &format!("/v1/vms/{vm}/migrate"), &serde_json::json!({}));
                self.log(&format!("  operator: cancel {vm}'s move back to {name} -> {}", if r.is_ok() { "cancelled" } else { "too late" }));
                cancelled.push(vm);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `bound` for the processes running to satisfy `done`; whether they did.
    fn wait_for(&self, bound: Duration, done: impl Fn(&tandem_sim::oracle::Running) -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < bound && !super::interrupted() {
            if done(&self.running_now()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}
