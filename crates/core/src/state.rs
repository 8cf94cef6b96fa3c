//! The replicated desired state: hosts, VM specs, and which host each VM is assigned to.
//!
//! Every change is a [`Command`] applied through the consensus log; [`ClusterState::apply`] is
//! deterministic and leaves the state untouched when it refuses a command, so every host that
//! applies the same log holds the same state.

use crate::hostset::{HostId, HostSet};
use crate::placement::{FttReport, Model, PlacementHost, PlacementResult, PlacementRule, PlacementVm, RuleKind, DEFAULT_FTT_BUDGET};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use thiserror::Error;

mod admission;
mod apply;
mod command;
mod failure;
mod leave;
mod lifecycle;
mod migration;
mod mirror;
mod sites;
mod tokens;

pub use crate::spec::*;
pub use command::*;
pub use lifecycle::{VmPhase, VmRecord, VmRecordWire};
pub use migration::{MAX_CLUSTER_MIGRATIONS, MAX_INCOMING_MIGRATIONS, MAX_OUTGOING_MIGRATIONS};
pub use sites::SiteLoss;
pub use tokens::*;

pub use admission::Admission;

/// Where a host stands in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HostStatus {
    /// Added, but its agent has not joined yet: nothing is placed on it.
    Joining,
    /// Runs the VMs assigned to it.
    Active,
    /// Declared failed; its VMs were reassigned. It must rejoin before it runs anything.
    Failed,
    /// Stopped for a planned stop, its VMs shut down cleanly and parked: nobody fails it over.
    /// It must rejoin before it runs anything.
    Left,
}

/// What an operator allows on a host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HostMode {
    /// Receives VMs.
    #[default]
    Normal,
    /// Planned work: receives no new VMs (it still votes and runs what it has).
    Maintenance,
    /// Taken out of placement until an operator puts it back.
    Disabled,
}

impl std::fmt::Display for HostMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostMode::Normal => "normal",
            HostMode::Maintenance => "maintenance",
            HostMode::Disabled => "disabled",
        })
    }
}

impl std::str::FromStr for HostMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(HostMode::Normal),
            "maintenance" => Ok(HostMode::Maintenance),
            "disabled" => Ok(HostMode::Disabled),
            other => Err(format!("host mode '{other}' is not one of normal, maintenance, disabled")),
        }
    }
}

/// A placement rule as the operator states it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Rule {
    pub name: String,
    pub kind: RuleKind,
    /// Hard rules are never broken (a VM stays down instead); soft ones are preferences.
    #[serde(default)]
    pub hard: bool,
    pub vms: Vec<String>,
    /// The site of a `site` rule (its members run there: required when hard, preferred when
    /// soft); none for the other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// Cluster-wide settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default)]
pub struct Settings {
    /// Failures-to-tolerate target that admission control protects; `None`: not enforced.
    pub ftt_target: Option<u32>,
    /// vCPUs a host offers per physical vCPU, in percent (100 = no overcommit).
    pub vcpu_overcommit_pct: u32,
    /// Per restart group: how long it waits for the lower groups to run before it starts anyway
    /// ([`DEFAULT_GROUP_DELAY_MS`] when absent; 0 means it does not wait).
    #[serde(with = "group_keys")]
    #[schemars(with = "BTreeMap<String, u64>")]
    pub group_delays_ms: BTreeMap<u8, u64>,
    /// What a host's planned stop does with its VMs, for the whole cluster; absent: each host's
    /// own `[shutdown] policy`. (A host of an older release ignores it and uses its own.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_policy: Option<ShutdownPolicy>,
    /// The target "survive one site": admission control refuses a change after which the loss
    /// of some whole site would leave a protected VM down (log format 11).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub survive_site_loss: bool,
    /// The site whose hosts a network split keeps running when no side holds a majority of
    /// the voters — a cut between two sites of equal weight (log format 14: an older host would
    /// reach another verdict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_site: Option<String>,
}

/// What a host's planned stop (SIGTERM, `tandem host shutdown`) does with its VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownPolicy {
    /// Kill them at once; peers restart them (a few seconds down).
    #[default]
    Kill,
    /// Move them away live first (maintenance), then kill what could not move.
    Migrate,
    /// Shut them down cleanly and park them: back with the host, or elsewhere after the
    /// host's `restart_elsewhere_after_s`.
    Shutdown,
    /// Shut them down cleanly and park them until the host returns; nothing fails over.
    Freeze,
}

impl ShutdownPolicy {
    /// Whether the VMs are shut down and parked with the host.
    #[must_use]
    pub fn parks(self) -> bool {
        matches!(self, ShutdownPolicy::Shutdown | ShutdownPolicy::Freeze)
    }
}

/// JSON object keys are strings, and a map with integer keys inside an internally tagged enum
/// (`Command`) does not read back through serde's buffering; so the keys are written and read
/// as strings explicitly, and every command round-trips (see `commands_round_trip`).
mod group_keys {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(map: &BTreeMap<u8, u64>, s: S) -> Result<S::Ok, S::Error> {
        map.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<String, u64>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u8, u64>, D::Error> {
        BTreeMap::<String, u64>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| k.parse::<u8>().map(|k| (k, v)).map_err(|_| D::Error::custom(format!("restart group '{k}' is not 0..=255"))))
            .collect()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            ftt_target: None,
            vcpu_overcommit_pct: 100,
            group_delays_ms: BTreeMap::new(),
            shutdown_policy: None,
            survive_site_loss: false,
            preferred_site: None,
        }
    }
}

impl Settings {
    /// How long restart group `group` waits for the lower groups.
    #[must_use]
    pub fn group_delay_ms(&self, group: u8) -> u64 {
        self.group_delays_ms.get(&group).copied().unwrap_or(DEFAULT_GROUP_DELAY_MS)
    }
}

/// A host in the desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub id: HostId,
    pub name: String,
    /// `ip:port` of its HTTP API (also used for consensus traffic).
    pub api_addr: String,
    /// `ip:port` of its UDP heartbeat socket.
    pub heartbeat_addr: String,
    pub capacity: Capacity,
    pub status: HostStatus,
    /// Raised every time the host (re)joins; a failover names the epoch it ends.
    pub epoch: u64,
    #[serde(default)]
    pub mode: HostMode,
    /// The site its configuration names (log format 11); `None`: no site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// Desired power state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PowerState {
    Running,
    Stopped,
}

/// A VM placed on a host. The generation rises at every placement, so a stale order can be told
/// from a current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub host: HostId,
    pub generation: u64,
}

/// Hosts a VM that keeps failing to start (or keeps crashing) is moved to, after its own host
/// gave up, before it is put in the error state.
pub const MAX_RELOCATIONS: usize = 2;

/// The whole replicated desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub hosts: BTreeMap<HostId, HostRecord>,
    pub vms: BTreeMap<String, VmRecord>,
    /// The next generation number handed out by a placement.
    pub next_generation: u64,
    #[serde(default)]
    pub rules: BTreeMap<String, Rule>,
    #[serde(default)]
    pub settings: Settings,
    /// API tokens by name (only their SHA-256 is kept).
    #[serde(default)]
    pub tokens: BTreeMap<String, ApiToken>,
    /// Raised by every command applied: an admission verdict names the revision it judged.
    #[serde(default)]
    pub revision: u64,
    /// The disk witness is a Raft voter (`SetWitness`, log format 12): one more vote, which no
    /// host's loss takes away.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disk_witness: bool,
}

impl ClusterState {
    /// The hosts that may run VMs.
    #[must_use]
    pub fn active_hosts(&self) -> HostSet {
        self.hosts.values().filter(|h| h.status == HostStatus::Active).map(|h| h.id).collect()
    }

    /// All hosts (voting members).
    #[must_use]
    pub fn members(&self) -> HostSet {
        self.hosts.keys().copied().collect()
    }

    /// The votes of the cluster's Raft: its hosts, and the disk witness if it has one.
    #[must_use]
    pub fn voters(&self) -> usize {
        self.hosts.len() + usize::from(self.disk_witness)
    }

    /// Whether the hosts left after `lost` of the members are lost still make a majority (the
    /// disk witness's vote stays: a survivor takes it over).
    #[must_use]
    pub fn quorum_after_losing(&self, lost: usize) -> bool {
        let voters = self.voters();
        voters.saturating_sub(lost) > voters / 2
    }

    /// A host's id by name.
    #[must_use]
    pub fn host_by_name(&self, name: &str) -> Option<&HostRecord> {
        self.hosts.values().find(|h| h.name == name)
    }

    /// `host`'s name, or its id for a host this state does not know.
    #[must_use]
    pub fn host_name(&self, host: HostId) -> String {
        self.hosts.get(&host).map_or_else(|| host.to_string(), |r| r.name.clone())
    }

    /// Resources taken on `host` by the VMs assigned to it, and held for those migrating to it.
    #[must_use]
    pub fn used(&self, host: HostId) -> Capacity {
        let mut c = Capacity::default();
        for vm in self.vms.values() {
            if vm.assignment().is_some_and(|a| a.host == host) || vm.migrating_to().is_some_and(|a| a.host == host) {
                c.vcpus += vm.spec.vcpus;
                c.memory_mib += vm.spec.memory_mib;
            }
        }
        c
    }

    /// Whether `demand` fits on `host` next to what it already runs (vCPUs with the overcommit
    /// ratio).
    #[must_use]
    pub fn fits(&self, host: HostId, demand: Capacity) -> bool {
        self.fits_with(host, demand, None)
    }

    /// Like [`ClusterState::fits`], not counting VM `except` (which is being resized).
    fn fits_with(&self, host: HostId, demand: Capacity, except: Option<&str>) -> bool {
        let Some(h) = self.hosts.get(&host) else { return false };
        let mut used = self.used(host);
        if let Some(v) = except.and_then(|n| self.vms.get(n)).filter(|v| v.assignment().is_some_and(|a| a.host == host)) {
            used.vcpus -= v.spec.vcpus;
            used.memory_mib -= v.spec.memory_mib;
        }
        let cpu_cap = u64::from(h.capacity.vcpus) * u64::from(self.settings.vcpu_overcommit_pct) / 100;
        u64::from(used.vcpus + demand.vcpus) <= cpu_cap && used.memory_mib + demand.memory_mib <= h.capacity.memory_mib
    }

    /// The placement model of this state. `usable` hosts may receive VMs (also active and in
    /// normal mode); `down` hosts count as failed.
    #[must_use]
    pub fn placement_model(&self, usable: HostSet) -> Model {
        let index: BTreeMap<HostId, u32> = self.hosts.keys().enumerate().map(|(i, h)| (*h, i as u32)).collect();
        let hosts = self
            .hosts
            .values()
            .map(|h| PlacementHost {
                id: h.id,
                mem_mib: h.capacity.memory_mib,
                cpu_milli: u64::from(h.capacity.vcpus) * u64::from(self.settings.vcpu_overcommit_pct) * 10,
                up: h.status == HostStatus::Active,
                usable: h.status == HostStatus::Active && h.mode == HostMode::Normal && usable.contains(h.id),
            })
            .collect();
        let vm_index: BTreeMap<&str, u32> = self.vms.keys().enumerate().map(|(i, n)| (n.as_str(), i as u32)).collect();
        let mut vms: Vec<PlacementVm> = self
            .vms
            .values()
            .map(|v| PlacementVm {
                name: v.spec.name.clone(),
                mem_mib: v.spec.memory_mib,
                cpu_milli: u64::from(v.spec.vcpus) * 1000,
                protection: v.spec.protection,
                priority: v.spec.priority,
                host: v.assignment().and_then(|a| index.get(&a.host).copied()),
                // A VM parked with its host's planned stop waits for that host, not for a
                // placement: no plan moves it.
                running: v.desired() == PowerState::Running && v.parked().is_none(),
                rules: Vec::new(),
                avoid: v.failed_on.iter().chain(&self.stale_copy_hosts(v)).filter_map(|h| index.get(h).copied()).collect(),
            })
            .collect();
        let rules = self
            .rules
            .values()
            .enumerate()
            .map(|(r, rule)| {
                let members: Vec<u32> = rule.vms.iter().filter_map(|n| vm_index.get(n.as_str()).copied()).collect();
                for m in &members {
                    vms[*m as usize].rules.push(r as u32);
                }
                let hosts = match (&rule.kind, &rule.site) {
                    (RuleKind::Site, Some(site)) => {
                        self.hosts.values().filter(|h| h.site.as_ref() == Some(site)).filter_map(|h| index.get(&h.id).copied()).collect()
                    }
                    _ => Vec::new(),
                };
                PlacementRule { name: rule.name.clone(), kind: rule.kind, hard: rule.hard, members, hosts }
            })
            .collect();
        Model::new(hosts, vms, rules)
    }

    /// The name and role of the stored token whose hash matches `presented`.
    #[must_use]
    pub fn token_role(&self, presented: &str) -> Option<(&str, Role)> {
        let hash = token_sha256(presented);
        self.tokens.values().find(|t| t.sha256 == hash).map(|t| (t.name.as_str(), t.role))
    }

    /// Places `names` (VMs without a host) on the `eligible` hosts, counting what is already
    /// assigned there. `allow_off` says whether `off` VMs may be placed (an operator start) or not.
    #[must_use]
    pub fn place(&self, names: &[String], eligible: HostSet, allow_off: bool) -> PlacementResult {
        let mut model = self.placement_model(eligible);
        let to_place: Vec<u32> = {
            let index: BTreeMap<&str, u32> = model.vms.iter().enumerate().map(|(i, v)| (v.name.as_str(), i as u32)).collect();
            names.iter().filter_map(|n| index.get(n.as_str()).copied()).collect()
        };
        // A VM started from its host's own disk starts where that disk's latest copy is, or
        // nowhere: any other host's copy is older (or missing), and starting from it would lose
        // what the guest wrote since.
        for i in &to_place {
            let Some(disk_host) = model.vms.get(*i as usize).and_then(|v| self.vms.get(&v.name)).and_then(VmRecord::start_host) else { continue };
            let only = model.host_index(disk_host);
            let others: Vec<u32> = (0..model.hosts.len() as u32).filter(|h| Some(*h) != only).collect();
            if let Some(v) = model.vms.get_mut(*i as usize) {
                v.avoid = others;
            }
        }
        model.named(&model.place(&[], to_place, allow_off, false))
    }

    /// Failures to tolerate now (every active host counts as usable).
    #[must_use]
    pub fn ftt(&self) -> FttReport {
        self.ftt_model().ftt(DEFAULT_FTT_BUDGET)
    }

    /// The model [`ClusterState::ftt`] searches: built under a lock, searched outside it.
    #[must_use]
    pub fn ftt_model(&self) -> Model {
        let mut model = self.placement_model(self.members());
        model.extra_votes = u32::from(self.disk_witness);
        model
    }

    /// A rule must name known VMs, be satisfiable by some placement, and not contradict
    /// another hard rule.
    fn check_rule(&self, rule: &Rule) -> Result<(), StateError> {
        let infeasible = |why: String| Err(StateError::RuleInfeasible { rule: rule.name.clone(), why });
        if !valid_name(&rule.name) {
            return infeasible("its name must be 1-63 letters, digits, '-' or '_'".into());
        }
        let mut vms: Vec<&String> = rule.vms.iter().collect();
        vms.sort();
        vms.dedup();
        match (rule.kind, &rule.site) {
            (RuleKind::Site, None) => return infeasible("a site rule names its site".into()),
            (RuleKind::Site, Some(site)) if !valid_name(site) => return Err(StateError::BadSite(site.clone())),
            (RuleKind::Site, Some(_)) if vms.is_empty() => return infeasible("it needs at least one VM".into()),
            (RuleKind::Site, Some(_)) => {}
            (_, Some(_)) => return infeasible("only a site rule names a site".into()),
            (_, None) if vms.len() < 2 => return infeasible("it needs at least two distinct VMs".into()),
            (_, None) => {}
        }
        if let Some(unknown) = vms.iter().find(|n| !self.vms.contains_key(n.as_str())) {
            return Err(StateError::UnknownVm((*unknown).clone()));
        }
        if rule.hard {
            match rule.kind {
                RuleKind::AntiAffinity => {
                    let hosts = self.hosts.len();
                    if vms.len() > hosts {
                        return infeasible(format!("{} VMs must be on different hosts, but the cluster has {hosts}", vms.len()));
                    }
                }
                RuleKind::Affinity => {
                    let mem: u64 = vms.iter().map(|n| self.vms[n.as_str()].spec.memory_mib).sum();
                    let cpus: u64 = vms.iter().map(|n| u64::from(self.vms[n.as_str()].spec.vcpus)).sum();
                    let fits = self
                        .hosts
                        .values()
                        .any(|h| h.capacity.memory_mib >= mem && u64::from(h.capacity.vcpus) * u64::from(self.settings.vcpu_overcommit_pct) / 100 >= cpus);
                    if !fits {
                        return infeasible(format!("together they need {mem} MiB and {cpus} vCPUs, more than any host has"));
                    }
                }
                RuleKind::Site => {
                    let site = rule.site.as_deref().unwrap_or_default();
                    if !self.hosts.values().any(|h| h.site.as_deref() == Some(site)) {
                        return infeasible(format!("no host is in site {site}"));
                    }
                    let elsewhere = self.rules.values().filter(|o| o.hard && o.name != rule.name && o.kind == RuleKind::Site && o.site != rule.site);
                    if let Some((other, vm)) = elsewhere.flat_map(|o| vms.iter().filter(|v| o.vms.contains(v)).map(move |v| (o, v))).next() {
                        return Err(StateError::RuleConflict {
                            rule: rule.name.clone(),
                            other: other.name.clone(),
                            why: format!("{vm} must be both in site {site} and in site {}", other.site.as_deref().unwrap_or_default()),
                        });
                    }
                }
            }
            let opposite =
                |o: &Rule| matches!((o.kind, rule.kind), (RuleKind::Affinity, RuleKind::AntiAffinity) | (RuleKind::AntiAffinity, RuleKind::Affinity));
            for other in self.rules.values().filter(|o| o.hard && o.name != rule.name && opposite(o)) {
                let shared: Vec<&String> = vms.iter().copied().filter(|v| other.vms.contains(v)).collect();
                if shared.len() >= 2 {
                    return Err(StateError::RuleConflict {
                        rule: rule.name.clone(),
                        other: other.name.clone(),
                        why: format!("{} must be both together and apart", shared.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" and ")),
                    });
                }
            }
        }
        Ok(())
    }

    /// Running VMs whose current hosts break `rule`.
    fn rule_violations(&self, rule: &Rule) -> Vec<String> {
        let placed: Vec<(&String, HostId)> = rule.vms.iter().filter_map(|n| self.vms.get(n).and_then(|v| v.assignment()).map(|a| (n, a.host))).collect();
        let mut out = Vec::new();
        for (i, (n, h)) in placed.iter().enumerate() {
            let clash = match rule.kind {
                RuleKind::AntiAffinity => placed.iter().enumerate().any(|(j, (_, g))| j != i && g == h),
                RuleKind::Affinity => placed.first().is_some_and(|(_, g)| g != h),
                RuleKind::Site => self.hosts.get(h).is_none_or(|r| r.site != rule.site),
            };
            if clash {
                out.push((*n).clone());
            }
        }
        out
    }

    /// VMs that should run and have no host: the coordinator's placement queue.
    #[must_use]
    pub fn unplaced(&self) -> Vec<String> {
        self.vms.values().filter(|v| v.is_waiting()).map(|v| v.spec.name.clone()).collect()
    }

    /// VMs assigned to `host`.
    pub fn assigned_to(&self, host: HostId) -> impl Iterator<Item = &VmRecord> {
        self.vms.values().filter(move |v| v.assignment().is_some_and(|a| a.host == host))
    }

    fn next_gen(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    fn vm_mut(&mut self, name: &str) -> Result<&mut VmRecord, StateError> {
        self.vms.get_mut(name).ok_or_else(|| StateError::UnknownVm(name.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::recovery;

    pub(crate) fn process_vm(name: &str, protection: Protection, priority: i32, mem: u64) -> VmSpec {
        VmSpec { protection, ..VmSpec::process(name, mem, priority, &["sleep", "1000"]) }
    }

    pub(crate) fn cluster(hosts: u32, mem: u64) -> ClusterState {
        let mut s = ClusterState::default();
        for i in 0..hosts {
            s.apply(&Command::AddHost {
                id: HostId(i),
                name: format!("h{i}"),
                api_addr: format!("127.0.0.1:{}", 7000 + i),
                heartbeat_addr: format!("127.0.0.1:{}", 7100 + i),
                capacity: Capacity { vcpus: 8, memory_mib: mem },
            })
            .expect("add host");
            s.apply(&Command::HostJoined { host: HostId(i) }).expect("join");
        }
        s
    }

    pub(crate) fn run_on(s: &mut ClusterState, spec: VmSpec, host: u32) {
        let name = spec.name.clone();
        s.apply(&Command::CreateVm { spec }).expect("create");
        s.apply(&Command::SetPower { name: name.clone(), desired: PowerState::Running, force: false }).expect("start");
        s.apply(&Command::Assign { name, host: HostId(host) }).expect("assign");
    }

    /// `Assign` and `Failover` are planned by the proposer on its copy of the state; when they
    /// are applied, host mode and hard rules are checked again, not only capacity (a host put in
    /// maintenance, or a rule added, between the plan and the commit).
    #[test]
    fn assign_and_failover_recheck_host_mode_and_hard_rules_when_applied() {
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 256), 0);
        s.apply(&Command::CreateVm { spec: process_vm("b", Protection::Protect, 0, 256) }).expect("create");
        s.apply(&Command::SetRule {
            rule: Rule { name: "apart".into(), kind: RuleKind::AntiAffinity, hard: true, vms: vec!["a".into(), "b".into()], site: None },
            force: true,
        })
        .expect("rule");
        s.apply(&Command::SetHostMode { host: HostId(2), mode: HostMode::Maintenance, force: true }).expect("mode");
        s.apply(&Command::SetPower { name: "b".into(), desired: PowerState::Running, force: true }).expect("start");
        let before = s.clone();
        assert!(matches!(s.apply(&Command::Assign { name: "b".into(), host: HostId(0) }), Err(StateError::BreaksHardRule { .. })));
        assert!(matches!(s.apply(&Command::Assign { name: "b".into(), host: HostId(2) }), Err(StateError::HostMode { .. })));
        assert_eq!(s, before, "a refused assignment changes nothing");
        s.apply(&Command::Assign { name: "b".into(), host: HostId(1) }).expect("allowed");
        // h1 fails; a stale plan puts b on the maintenance host h2 and... nowhere else fits the rule.
        let epoch = s.hosts[&HostId(1)].epoch;
        match s.apply(&Command::Failover { host: HostId(1), epoch, plan: vec![("b".into(), HostId(2))] }) {
            Ok(Applied::FailedOver { moved, .. }) => assert!(moved.is_empty(), "moved onto a maintenance host: {moved:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.vms["b"].assignment(), None, "b waits for a host instead");
        let mut t = before.clone();
        t.apply(&Command::Assign { name: "b".into(), host: HostId(1) }).expect("allowed");
        let epoch = t.hosts[&HostId(1)].epoch;
        match t.apply(&Command::Failover { host: HostId(1), epoch, plan: vec![("b".into(), HostId(0))] }) {
            Ok(Applied::FailedOver { moved, .. }) => assert!(moved.is_empty(), "hard anti-affinity broken by a failover: {moved:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refused_commands_change_nothing() {
        let mut s = cluster(2, 1024);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 512), 0);
        let before = s.clone();
        let refused = [
            Command::CreateVm { spec: process_vm("a", Protection::Protect, 0, 512) },
            Command::CreateVm { spec: process_vm("bad name!", Protection::Protect, 0, 512) },
            Command::DeleteVm { name: "a".into() },
            Command::DeleteVm { name: "nope".into() },
            Command::Assign { name: "a".into(), host: HostId(1) },
            Command::Release { name: "a".into(), host: HostId(0), generation: 99 },
            Command::Failover { host: HostId(0), epoch: 7, plan: vec![] },
            Command::AddHost { id: HostId(64), name: "x".into(), api_addr: String::new(), heartbeat_addr: String::new(), capacity: Capacity::default() },
            Command::AddHost { id: HostId(5), name: "h0".into(), api_addr: String::new(), heartbeat_addr: String::new(), capacity: Capacity::default() },
            Command::SetPower { name: "ghost".into(), desired: PowerState::Running, force: false },
        ];
        for c in &refused {
            assert!(s.apply(c).is_err(), "{c:?} was accepted");
            assert_eq!(s, before, "{c:?} changed state");
        }
    }

    #[test]
    fn assignment_respects_capacity_and_raises_generation() {
        let mut s = cluster(1, 1024);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 600), 0);
        s.apply(&Command::CreateVm { spec: process_vm("b", Protection::Protect, 0, 600) }).expect("create");
        s.apply(&Command::SetPower { name: "b".into(), desired: PowerState::Running, force: false }).expect("start");
        assert_eq!(s.apply(&Command::Assign { name: "b".into(), host: HostId(0) }), Err(StateError::NoCapacity { vm: "b".into(), host: HostId(0) }));
        let g1 = s.vms["a"].assignment().expect("assigned").generation;
        assert!(g1 >= 1);
    }

    #[test]
    fn stop_release_delete_lifecycle() {
        let mut s = cluster(1, 1024);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 100), 0);
        let gen = s.vms["a"].assignment().expect("assigned").generation;
        s.apply(&Command::SetPower { name: "a".into(), desired: PowerState::Stopped, force: false }).expect("stop");
        assert_eq!(s.apply(&Command::DeleteVm { name: "a".into() }), Err(StateError::VmNotStopped("a".into())));
        s.apply(&Command::Release { name: "a".into(), host: HostId(0), generation: gen }).expect("release");
        s.apply(&Command::DeleteVm { name: "a".into() }).expect("delete");
        assert!(s.vms.is_empty());
    }

    #[test]
    fn a_failing_vm_moves_away_then_enters_the_error_state_until_cleared() {
        let mut s = cluster(4, 2048);
        run_on(&mut s, process_vm("f", Protection::Protect, 0, 64), 0);
        let failed = |s: &mut ClusterState, host: u32| {
            let a = s.vms["f"].assignment().expect("assigned");
            assert_eq!(a.host, HostId(host));
            s.apply(&Command::VmFailed { name: "f".into(), host: a.host, generation: a.generation, detail: "exit 1".into() })
        };
        // A report for a generation it no longer holds is stale and changes nothing.
        let before = s.clone();
        let g = s.vms["f"].assignment().expect("assigned").generation;
        assert!(matches!(
            s.apply(&Command::VmFailed { name: "f".into(), host: HostId(0), generation: g + 1, detail: String::new() }),
            Err(StateError::Stale(_))
        ));
        assert_eq!(s, before);
        // Released and placed elsewhere: placement never picks a host it failed on.
        let mut tried = vec![0];
        for _ in 0..MAX_RELOCATIONS {
            let out = failed(&mut s, *tried.last().expect("one")).expect("relocate");
            assert!(matches!(out, Applied::Relocating { ref failed_on, .. } if failed_on.len() == tried.len()), "{out:?}");
            assert_eq!(s.vms["f"].desired(), PowerState::Running);
            let plan = crate::recovery::place(&s, &["f".to_string()], s.active_hosts(), true);
            let (_, next) = plan.placements.first().cloned().expect("placed");
            assert!(!tried.contains(&next.0), "placed again on {next} after failing there");
            s.apply(&Command::Assign { name: "f".into(), host: next }).expect("assign");
            tried.push(next.0);
        }
        let out = failed(&mut s, *tried.last().expect("one")).expect("error");
        assert!(matches!(out, Applied::VmInError { ref error, .. } if error.contains("exit 1")), "{out:?}");
        assert_eq!((s.vms["f"].desired(), s.vms["f"].assignment()), (PowerState::Stopped, None));
        // Starting is refused until an operator clears it; clearing forgets the history.
        let start = Command::SetPower { name: "f".into(), desired: PowerState::Running, force: false };
        assert!(matches!(s.apply(&start), Err(StateError::VmInError { .. })));
        s.apply(&Command::ClearVmError { name: "f".into() }).expect("clear");
        assert!(s.vms["f"].failed_on.is_empty() && s.vms["f"].error().is_none());
        s.apply(&start).expect("start after clear");
    }

    #[test]
    fn a_small_cluster_runs_out_of_hosts_before_the_relocation_budget() {
        let mut s = cluster(2, 2048);
        run_on(&mut s, process_vm("f", Protection::Protect, 0, 64), 0);
        let g = s.vms["f"].assignment().expect("assigned").generation;
        let out = s.apply(&Command::VmFailed { name: "f".into(), host: HostId(0), generation: g, detail: "x".into() });
        assert!(matches!(out, Ok(Applied::Relocating { .. })), "{out:?}");
        s.apply(&Command::Assign { name: "f".into(), host: HostId(1) }).expect("assign");
        let g = s.vms["f"].assignment().expect("assigned").generation;
        let out = s.apply(&Command::VmFailed { name: "f".into(), host: HostId(1), generation: g, detail: "x".into() });
        assert!(matches!(out, Ok(Applied::VmInError { .. })), "{out:?}");
    }

    /// Every command survives the consensus log's encoding: one that did not would be
    /// committed and then fail to load on every host.
    #[test]
    fn commands_round_trip() {
        let mut settings = Settings::default();
        settings.group_delays_ms.insert(2, 30_000);
        settings.ftt_target = Some(1);
        let spec = process_vm("a", Protection::BestEffort, 3, 64);
        let commands = [
            Command::SetSettings { settings, force: true },
            Command::CreateVm { spec: spec.clone() },
            Command::UpdateVm { spec, force: false },
            Command::SetPower { name: "a".into(), desired: PowerState::Running, force: false },
            Command::SetHostMode { host: HostId(1), mode: HostMode::Maintenance, force: false },
            Command::Assign { name: "a".into(), host: HostId(2) },
            Command::Release { name: "a".into(), host: HostId(2), generation: 9 },
            Command::VmFailed { name: "a".into(), host: HostId(2), generation: 9, detail: "x".into() },
            Command::StopExited { name: "a".into(), host: HostId(2), generation: 9 },
            Command::SetHostSite { host: HostId(2), site: Some("east".into()) },
            Command::SetHostSite { host: HostId(2), site: None },
            Command::SetWitness { disk: true },
            Command::ClearVmError { name: "a".into() },
            Command::ReleaseHeld { names: vec!["a".into()] },
            Command::CapacityRetry { name: "a".into() },
            Command::Failover { host: HostId(0), epoch: 3, plan: vec![("a".into(), HostId(1))] },
            Command::HostJoined { host: HostId(1) },
            Command::AddHost {
                id: HostId(3),
                name: "h3".into(),
                api_addr: "a:1".into(),
                heartbeat_addr: "a:2".into(),
                capacity: Capacity { vcpus: 4, memory_mib: 512 },
            },
            Command::SetRule {
                rule: Rule { name: "r".into(), kind: crate::placement::RuleKind::AntiAffinity, hard: true, vms: vec!["a".into(), "b".into()], site: None },
                force: false,
            },
            Command::DeleteRule { name: "r".into() },
            Command::DeleteVm { name: "a".into() },
            Command::SetToken { token: ApiToken { name: "ro".into(), role: Role::ReadOnly, sha256: token_sha256("x") } },
            Command::DeleteToken { name: "ro".into() },
        ];
        for c in commands {
            let json = serde_json::to_vec(&c).expect("encode");
            let back: Command = serde_json::from_slice(&json).unwrap_or_else(|e| panic!("{c:?} does not read back: {e}"));
            assert_eq!(back, c);
            let tagged: serde_json::Value = serde_json::from_slice(&json).expect("json");
            assert_eq!(tagged["op"], c.op(), "the timeline's name of a command is its log tag");
        }
    }

    #[test]
    fn tokens_are_kept_hashed_and_checked() {
        let mut s = cluster(1, 1024);
        let t = ApiToken { name: "ops".into(), role: Role::ReadOnly, sha256: token_sha256("s3cret-token") };
        s.apply(&Command::SetToken { token: t.clone() }).expect("set");
        assert_eq!(s.token_role("s3cret-token"), Some(("ops", Role::ReadOnly)));
        assert_eq!(s.token_role("s3cret-tokeN"), None);
        assert!(!serde_json::to_string(&s).expect("json").contains("s3cret-token"), "the token itself is never stored");
        assert_eq!(s.apply(&Command::SetToken { token: t }), Err(StateError::TokenExists("ops".into())));
        let bad = ApiToken { name: "x".into(), role: Role::Admin, sha256: "ABC".into() };
        assert!(matches!(s.apply(&Command::SetToken { token: bad }), Err(StateError::BadToken(_))));
        s.apply(&Command::DeleteToken { name: "ops".into() }).expect("delete");
        assert_eq!(s.token_role("s3cret-token"), None);
        assert_eq!(s.apply(&Command::DeleteToken { name: "ops".into() }), Err(StateError::UnknownToken("ops".into())));
    }

    #[test]
    fn failover_needs_the_current_epoch_and_moves_by_plan() {
        let mut s = cluster(3, 2048);
        run_on(&mut s, process_vm("p", Protection::Protect, 0, 512), 0);
        run_on(&mut s, process_vm("b", Protection::BestEffort, 0, 512), 0);
        run_on(&mut s, process_vm("o", Protection::Off, 0, 16), 0);
        let epoch = s.hosts[&HostId(0)].epoch;
        let plan = vec![("p".to_string(), HostId(1)), ("o".to_string(), HostId(0))];
        let out = s.apply(&Command::Failover { host: HostId(0), epoch, plan }).expect("failover");
        let Applied::FailedOver { moved, left_down, .. } = out else { panic!("unexpected {out:?}") };
        assert_eq!(moved.len(), 1);
        assert_eq!(left_down, vec!["b".to_string(), "o".to_string()]);
        assert_eq!(s.vms["p"].assignment().map(|a| a.host), Some(HostId(1)));
        // Best-effort waits for capacity a bounded number of retries; `off` is stopped.
        assert_eq!((s.vms["b"].desired(), s.vms["b"].capacity_retries()), (PowerState::Running, Some(0)));
        assert_eq!(s.vms["o"].desired(), PowerState::Stopped);
        assert_eq!(s.hosts[&HostId(0)].status, HostStatus::Failed);
        // A second failover for the same epoch is stale.
        assert!(matches!(s.apply(&Command::Failover { host: HostId(0), epoch, plan: vec![] }), Err(StateError::Stale(_))));
        // After rejoining, a failover decided on the old epoch is refused.
        s.apply(&Command::HostJoined { host: HostId(0) }).expect("rejoin");
        assert!(matches!(s.apply(&Command::Failover { host: HostId(0), epoch, plan: vec![] }), Err(StateError::Stale(_))));
    }

    #[test]
    fn spec_validation_messages() {
        let mut bad = process_vm("x", Protection::Off, 0, 8);
        assert_eq!(bad.validate(), Err(SpecError::BadMemory(8)));
        bad.memory_mib = 64;
        bad.driver = DriverSpec::Qemu { kernel: None, initrd: None, cmdline: None, extra_args: vec![], guest_agent: false };
        assert_eq!(bad.validate(), Err(SpecError::NothingToBoot));
        bad.driver = DriverSpec::Process { command: vec![] };
        assert_eq!(bad.validate(), Err(SpecError::EmptyCommand));
        assert_eq!("bogus".parse::<Protection>().map_err(|e| e.contains("bogus")), Err(true));
    }

    /// Hostile specs: every value that ends up inside a QEMU option is refused when it could
    /// add an option of its own, and an ordinary spec still passes.
    #[test]
    fn hostile_spec_values_are_refused() {
        let qemu = |f: &dyn Fn(&mut VmSpec)| {
            let mut v = process_vm("q", Protection::Protect, 0, 128);
            v.driver = DriverSpec::Qemu {
                kernel: Some("/srv/vmlinuz".into()),
                initrd: None,
                cmdline: Some("console=ttyS0".into()),
                extra_args: vec![],
                guest_agent: false,
            };
            v.network = Some(NetworkSpec::User { hostfwd: vec!["tcp:{host_ip}:8080-:80".into()] });
            v.disks = vec![DiskSpec { path: "/shared/q.raw".into(), format: Some("raw".into()), readonly: false, local: false, mirror: false }];
            f(&mut v);
            v.check_arguments()
        };
        assert_eq!(qemu(&|_| {}), Ok(()));
        let bridged = |v: &mut VmSpec| {
            v.network = Some(NetworkSpec::Bridge { bridge: "vmbr0".into(), mac: "52:54:00:ab:cd:01".into(), address: Some("198.18.0.100/24".into()) });
        };
        assert_eq!(qemu(&bridged), Ok(()));
        type Edit = Box<dyn Fn(&mut VmSpec)>;
        let hostile: Vec<(&str, Edit)> = vec![
            ("hostfwd", Box::new(|v| v.network = Some(NetworkSpec::User { hostfwd: vec!["tcp::1-:2,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh".into()] }))),
            ("hostfwd", Box::new(|v| v.network = Some(NetworkSpec::User { hostfwd: vec!["tcp:1.2.3.4:80-:22:x".into()] }))),
            ("ifname", Box::new(|v| v.network = Some(NetworkSpec::Tap { ifname: "tap0,helper=/bin/sh".into(), mac: None }))),
            ("mac", Box::new(|v| v.network = Some(NetworkSpec::Tap { ifname: "tap0".into(), mac: Some("52:54:00:12:34:56,romfile=/etc/shadow".into()) }))),
            ("bridge", Box::new(|v| v.network = Some(NetworkSpec::Bridge { bridge: "br0,script=/x".into(), mac: "52:54:00:00:00:01".into(), address: None }))),
            ("mac", Box::new(|v| v.network = Some(NetworkSpec::Bridge { bridge: "br0".into(), mac: "01:00:5e:00:00:01".into(), address: None }))),
            ("mac", Box::new(|v| v.network = Some(NetworkSpec::Bridge { bridge: "br0".into(), mac: "52:54:00:00:01".into(), address: None }))),
            (
                "address",
                Box::new(|v| {
                    v.network =
                        Some(NetworkSpec::Bridge { bridge: "br0".into(), mac: "52:54:00:00:00:01".into(), address: Some("1.2.3.4/24 init=/bin/sh".into()) })
                }),
            ),
            (
                "address",
                Box::new(|v| {
                    v.network = Some(NetworkSpec::Bridge { bridge: "br0".into(), mac: "52:54:00:00:00:01".into(), address: Some("1.2.3.4/33".into()) })
                }),
            ),
            ("disk format", Box::new(|v| v.disks[0].format = Some("raw,driver=vvfat".into()))),
            ("disk path", Box::new(|v| v.disks[0].path = "/shared/../etc/shadow".into())),
            ("disk path", Box::new(|v| v.disks[0].path = "/shared/a\nb".into())),
            (
                "kernel",
                Box::new(|v| {
                    v.driver = DriverSpec::Qemu { kernel: Some("vmlinuz".into()), initrd: None, cmdline: None, extra_args: vec![], guest_agent: false }
                }),
            ),
            (
                "cmdline",
                Box::new(|v| {
                    v.driver =
                        DriverSpec::Qemu { kernel: Some("/k".into()), initrd: None, cmdline: Some("a\u{0}b".into()), extra_args: vec![], guest_agent: false }
                }),
            ),
        ];
        for (field, f) in hostile {
            match qemu(&*f) {
                Err(SpecError::BadValue { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{field}: a hostile value was not refused: {other:?}"),
            }
        }
    }

    /// Three hosts of 2000 MiB with two 600 MiB protected VMs each and an FTT target of 1 (met),
    /// and two commands: starting a 100 MiB VM (fits) and a 700 MiB one (breaks the target).
    pub(crate) fn three_hosts_near_target() -> (ClusterState, Command, Command) {
        let mut s = cluster(3, 2000);
        for i in 0..6u32 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 600), i % 3);
        }
        target(&mut s, 1);
        s.apply(&Command::CreateVm { spec: process_vm("small", Protection::Protect, 0, 100) }).expect("create");
        s.apply(&Command::CreateVm { spec: process_vm("big", Protection::Protect, 0, 700) }).expect("create");
        let start = |name: &str| Command::SetPower { name: name.into(), desired: PowerState::Running, force: false };
        (s, start("small"), start("big"))
    }

    fn target(s: &mut ClusterState, ftt: u32) {
        s.apply(&Command::SetSettings { settings: Settings { ftt_target: Some(ftt), ..s.settings.clone() }, force: false }).expect("target");
    }

    /// Admission control: with a target of one failure, starting a VM that could no longer
    /// restart after some host failure is refused with a message naming the host and the VM,
    /// and nothing changes; `force` applies it and says so.
    #[test]
    fn admission_control_refuses_what_breaks_the_ftt_target() {
        // 3 hosts × 1000 MiB; two 400 MiB VMs per host: any one host's VMs fit on the others.
        let mut s = cluster(3, 1000);
        for i in 0..6u32 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 400), i % 3);
        }
        // Each host has 200 MiB free: losing a host displaces 800 MiB into 400 MiB. FTT is 0.
        assert_eq!(s.ftt().ftt, 0);
        // 3 hosts × 2000 MiB, two 600 MiB VMs each: a failed host's 1200 MiB fit in 800 + 800.
        let mut s = cluster(3, 2000);
        for i in 0..6u32 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 600), i % 3);
        }
        assert_eq!(s.ftt().ftt, 1);
        target(&mut s, 1);
        // 700 MiB more on host 0: if it fails, 700 + 600 + 600 do not fit in 800 + 800.
        s.apply(&Command::CreateVm { spec: process_vm("big", Protection::Protect, 0, 700) }).expect("create (stopped) is free");
        let before = s.clone();
        let err = s.apply(&Command::SetPower { name: "big".into(), desired: PowerState::Running, force: false }).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("starting VM 'big'") && msg.contains("failures-to-tolerate to 0 (target 1)") && msg.contains("--force"), "{msg}");
        assert!(msg.contains("if h") && msg.contains("could not restart"), "{msg}");
        assert_eq!(s, before, "a refusal changes nothing");
        // A bigger size for a running VM, and maintenance of a host, are refused alike.
        let mut grown = s.vms["v0"].spec.clone();
        grown.memory_mib = 1000;
        assert!(matches!(s.apply(&Command::UpdateVm { spec: grown.clone(), force: false }), Err(StateError::Admission(_))));
        assert!(matches!(s.apply(&Command::SetHostMode { host: HostId(2), mode: HostMode::Maintenance, force: false }), Err(StateError::Admission(_))));
        assert_eq!(s, before);
        // Forced: applied, and the result says why it would have been refused.
        let forced = s.apply(&Command::SetPower { name: "big".into(), desired: PowerState::Running, force: true }).expect("forced");
        assert!(matches!(&forced, Applied::Forced { reason } if reason.contains("big")), "{forced:?}");
        // A smaller size is always fine.
        let mut small = s.vms["v1"].spec.clone();
        small.memory_mib = 200;
        assert_eq!(s.apply(&Command::UpdateVm { spec: small, force: false }), Ok(Applied::Done));
    }

    #[test]
    fn rules_are_checked_when_made() {
        let mut s = cluster(3, 4000);
        for i in 0..4u32 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 1000), i % 3);
        }
        let rule = |name: &str, kind, hard, vms: &[&str]| Command::SetRule {
            rule: Rule { name: name.into(), kind, hard, vms: vms.iter().map(|v| v.to_string()).collect(), site: None },
            force: false,
        };
        // v0 and v3 share host 0: the rule is stored and the violation reported.
        assert_eq!(s.apply(&rule("apart", RuleKind::AntiAffinity, true, &["v0", "v3"])), Ok(Applied::RuleSet { violations: vec!["v0".into(), "v3".into()] }));
        let conflict = s.apply(&rule("together", RuleKind::Affinity, true, &["v3", "v0", "v1"])).expect_err("conflict");
        assert!(conflict.to_string().contains("must be both together and apart"), "{conflict}");
        let too_many = s.apply(&rule("spread", RuleKind::AntiAffinity, true, &["v0", "v1", "v2", "v3"])).expect_err("4 VMs, 3 hosts");
        assert!(matches!(too_many, StateError::RuleInfeasible { .. }), "{too_many}");
        s.apply(&Command::CreateVm { spec: process_vm("huge", Protection::Protect, 0, 3500) }).expect("create");
        let heavy = s.apply(&rule("heavy", RuleKind::Affinity, true, &["huge", "v1"])).expect_err("4500 MiB > 4000");
        assert!(heavy.to_string().contains("more than any host has"), "{heavy}");
        assert_eq!(s.apply(&rule("ghost", RuleKind::Affinity, false, &["v1", "nope"])), Err(StateError::UnknownVm("nope".into())));
        // Soft rules never conflict.
        assert!(matches!(s.apply(&rule("near", RuleKind::Affinity, false, &["v0", "v3"])), Ok(Applied::RuleSet { .. })));
        assert_eq!(s.apply(&Command::DeleteRule { name: "nope".into() }), Err(StateError::UnknownRule("nope".into())));
        // A hard anti-affinity rule now keeps v1 off v2's host when host 1 fails.
        s.apply(&rule("v1-v2", RuleKind::AntiAffinity, true, &["v1", "v2"])).expect("rule");
        let plan = recovery::plan_failover(&s, HostId(1), s.active_hosts());
        assert_eq!(plan.placements, vec![("v1".to_string(), HostId(0))]);
    }

    #[test]
    fn vcpu_overcommit_is_counted() {
        let mut s = cluster(1, 100_000);
        let mut spec = process_vm("wide", Protection::Protect, 0, 100);
        spec.vcpus = 12;
        s.apply(&Command::CreateVm { spec }).expect("create");
        assert!(!s.fits(HostId(0), Capacity { vcpus: 12, memory_mib: 100 }), "8 vCPUs at 100 %");
        s.apply(&Command::SetSettings { settings: Settings { vcpu_overcommit_pct: 200, ..s.settings.clone() }, force: false }).expect("200 %");
        assert!(s.fits(HostId(0), Capacity { vcpus: 12, memory_mib: 100 }));
        assert!(s.apply(&Command::SetSettings { settings: Settings { vcpu_overcommit_pct: 50, ..s.settings.clone() }, force: false }).is_err());
    }
}
