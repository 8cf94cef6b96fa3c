//! Placement and failures-to-tolerate (FTT): where VMs go when hosts fail, and how many
//! simultaneous host failures the cluster can take while every `protect` VM still restarts.
//!
//! Everything works on a compact [`Model`] built once from the cluster state (or directly, for
//! benchmarks): hosts with memory and vCPU capacity (vCPUs times the overcommit ratio, in
//! milli-vCPUs), VMs with their demand, protection, priority and current host, and rules.
//! [`Model::plan`] is the one placement routine; the live recovery path, `tandem plan`,
//! `tandem whatif` and the FTT search all call it, so the plan shown is the plan executed.
//!
//! Order: `protect` before `best-effort`; higher priority first; larger memory first (the big
//! ones are hardest to fit); then by name. Each VM goes to the allowed host that breaks the
//! fewest soft rules, then has the most free memory, then the lowest id (worst fit: it spreads
//! load and keeps room for large VMs on every host).

use crate::hostset::HostId;
use crate::spec::Protection;
use serde::{Deserialize, Serialize};

/// Whether a rule keeps VMs together or apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RuleKind {
    /// All members on one host.
    Affinity,
    /// No two members on one host.
    AntiAffinity,
    /// Every member on a host of one site (the rule's `site`; log format 11).
    Site,
}

/// A host as placement sees it.
#[derive(Clone, Debug)]
pub struct PlacementHost {
    pub id: HostId,
    pub mem_mib: u64,
    /// vCPUs × overcommit ratio, in thousandths of a vCPU.
    pub cpu_milli: u64,
    /// Up and taking part in consensus (a host in maintenance is up but not usable).
    pub up: bool,
    /// May receive VMs: active and not in maintenance or disabled.
    pub usable: bool,
}

/// A VM as placement sees it.
#[derive(Clone, Debug)]
pub struct PlacementVm {
    pub name: String,
    pub mem_mib: u64,
    pub cpu_milli: u64,
    pub protection: Protection,
    pub priority: i32,
    /// Index into [`Model::hosts`] of the host it is assigned to.
    pub host: Option<u32>,
    /// Desired running.
    pub running: bool,
    /// Indices into [`Model::rules`].
    pub rules: Vec<u32>,
    /// Host indices it must not go to (it kept failing there).
    pub avoid: Vec<u32>,
}

/// A placement rule over VMs.
#[derive(Clone, Debug)]
pub struct PlacementRule {
    pub name: String,
    pub kind: RuleKind,
    /// Hard rules are never broken (a VM stays down instead); soft rules are preferences.
    pub hard: bool,
    /// Indices into [`Model::vms`].
    pub members: Vec<u32>,
    /// For a [`RuleKind::Site`] rule: the hosts of its site (indices into [`Model::hosts`]).
    pub hosts: Vec<u32>,
}

/// Why a VM is not placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotPlaced {
    /// Protection `off`: HA never restarts it.
    ProtectionOff,
    /// No usable host has room for it.
    NoCapacity,
    /// Hosts with room exist, but every one of them would break a hard rule.
    HardRule,
}

/// A plan over model indices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// (VM index, host index), in placement order.
    pub placed: Vec<(u32, u32)>,
    pub not_placed: Vec<(u32, NotPlaced)>,
}

/// The cluster, compact.
#[derive(Clone, Debug, Default)]
pub struct Model {
    pub hosts: Vec<PlacementHost>,
    pub vms: Vec<PlacementVm>,
    pub rules: Vec<PlacementRule>,
    /// Per host: VM indices assigned to it.
    by_host: Vec<Vec<u32>>,
    /// Per host: memory and CPU taken by its assigned VMs.
    used: Vec<(u64, u64)>,
    /// Per VM: its position in the placement order (see the module docs).
    rank: Vec<u32>,
    /// Votes besides the hosts' that no host failure takes away (the disk witness's), for the
    /// quorum bound of the FTT search.
    pub extra_votes: u32,
}

/// Why a VM is not placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum LeftDown {
    /// Protection `off`: HA never restarts it.
    ProtectionOff,
    /// No eligible host has room for it.
    NoCapacity,
    /// Hosts with room exist, but each would break a hard placement rule.
    HardRule,
    /// The hosts left are not a majority of the voting hosts: they cannot commit a failover.
    NoQuorum,
    /// Its writable disk is on its failed host's own storage: it waits for that host.
    LocalDisk,
    /// Its disks are mirrored between sites, and no surviving site's copy is current.
    NoCurrentCopy,
}

/// The result of one placement run: where each VM goes, and which stay down and why. (Not a
/// site-recovery plan: that word is kept for the runbooks of a second site.)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlacementResult {
    pub placements: Vec<(String, HostId)>,
    pub left_down: Vec<(String, LeftDown)>,
}

impl Model {
    /// A plan with names: VM names and host ids instead of indexes.
    #[must_use]
    pub fn named(&self, plan: &Plan) -> PlacementResult {
        let model = self;
        PlacementResult {
            placements: plan.placed.iter().map(|(v, h)| (model.vms[*v as usize].name.clone(), model.hosts[*h as usize].id)).collect(),
            left_down: plan
                .not_placed
                .iter()
                .map(|(v, why)| {
                    let why = match why {
                        NotPlaced::ProtectionOff => LeftDown::ProtectionOff,
                        NotPlaced::NoCapacity => LeftDown::NoCapacity,
                        NotPlaced::HardRule => LeftDown::HardRule,
                    };
                    (model.vms[*v as usize].name.clone(), why)
                })
                .collect(),
        }
    }
}

/// What caps failures-to-tolerate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FttLimit {
    /// A failure set one larger leaves a protected VM down.
    Capacity,
    /// One more failure loses the consensus majority, so nothing restarts.
    Quorum,
    /// No host would be left.
    Hosts,
    /// A protected VM finds no host even now: FTT 0, and the counterexample names it with an
    /// empty failure set.
    Unplaceable,
    /// The exhaustive search stopped at its budget (see `exact`).
    SearchBudget,
}

impl std::fmt::Display for FttLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FttLimit::Capacity => "capacity",
            FttLimit::Quorum => "quorum",
            FttLimit::Hosts => "hosts",
            FttLimit::Unplaceable => "unplaceable",
            FttLimit::SearchBudget => "search-budget",
        })
    }
}

/// What the FTT search found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FttReport {
    /// Host failures every `protect` VM survives (it restarts elsewhere), as far as known: exact
    /// when `exact`, otherwise a lower bound (never more than the true value).
    pub ftt: u32,
    pub exact: bool,
    /// What caps it.
    pub limited_by: FttLimit,
    /// Failure sets of every size up to this were checked one by one.
    pub checked_up_to: u32,
    /// Failure sets planned during the search.
    pub sets_checked: u64,
    /// When limited by capacity: a failure set of size `ftt + 1` and the protected VMs it leaves
    /// down.
    pub counterexample: Option<(Vec<HostId>, Vec<String>)>,
}

/// Failure sets the exhaustive FTT search plans at most before it falls back to the bound.
pub const DEFAULT_FTT_BUDGET: u64 = 20_000;

/// The host with the most free memory that fits `vm` and `allowed` accepts, from the heap. Hosts
/// passed over for this VM are put back.
fn best_from_heap(
    heap: &mut std::collections::BinaryHeap<(u64, std::cmp::Reverse<u32>)>,
    free: &[(u64, u64)],
    allowed: impl Fn(u32) -> bool,
    vm: &PlacementVm,
) -> (Option<u32>, bool) {
    let mut passed = Vec::new();
    let mut found = None;
    let mut room_somewhere = false;
    while let Some((mem, std::cmp::Reverse(h))) = heap.pop() {
        if mem != free[h as usize].0 {
            continue; // stale
        }
        if vm.avoid.contains(&h) {
            passed.push((mem, std::cmp::Reverse(h)));
            continue;
        }
        if mem < vm.mem_mib {
            // Nothing further down has the memory either.
            passed.push((mem, std::cmp::Reverse(h)));
            break;
        }
        if free[h as usize].1 < vm.cpu_milli {
            passed.push((mem, std::cmp::Reverse(h)));
            continue;
        }
        room_somewhere = true;
        if allowed(h) {
            found = Some(h);
            // Re-pushed with its new free memory by the caller.
            break;
        }
        passed.push((mem, std::cmp::Reverse(h)));
    }
    heap.extend(passed);
    (found, room_somewhere)
}

fn order_key(vm: &PlacementVm) -> (u8, i64, u64, &str) {
    let level = match vm.protection {
        Protection::Protect => 0,
        Protection::BestEffort => 1,
        Protection::Off => 2,
    };
    (level, -i64::from(vm.priority), u64::MAX - vm.mem_mib, vm.name.as_str())
}

fn binomial(n: u64, k: u64) -> u64 {
    let k = k.min(n.saturating_sub(k));
    let mut r: u64 = 1;
    for i in 0..k {
        r = r.saturating_mul(n - i) / (i + 1);
    }
    r
}

impl Model {
    /// Builds the model's indices; call after filling hosts, VMs and rules.
    #[must_use]
    pub fn new(hosts: Vec<PlacementHost>, vms: Vec<PlacementVm>, rules: Vec<PlacementRule>) -> Model {
        let mut by_host = vec![Vec::new(); hosts.len()];
        let mut used = vec![(0u64, 0u64); hosts.len()];
        for (i, v) in vms.iter().enumerate() {
            if let Some(h) = v.host {
                by_host[h as usize].push(i as u32);
                used[h as usize].0 += v.mem_mib;
                used[h as usize].1 += v.cpu_milli;
            }
        }
        let mut order: Vec<u32> = (0..vms.len() as u32).collect();
        order.sort_by(|a, b| order_key(&vms[*a as usize]).cmp(&order_key(&vms[*b as usize])));
        let mut rank = vec![0u32; vms.len()];
        for (pos, v) in order.iter().enumerate() {
            rank[*v as usize] = pos as u32;
        }
        Model { hosts, vms, rules, by_host, used, rank, extra_votes: 0 }
    }

    /// The index of host `id`.
    #[must_use]
    pub fn host_index(&self, id: HostId) -> Option<u32> {
        self.hosts.iter().position(|h| h.id == id).map(|i| i as u32)
    }

    /// The VMs assigned to the `failed` hosts that should run (the victims of that failure).
    #[must_use]
    pub fn victims(&self, failed: &[u32]) -> Vec<u32> {
        failed.iter().flat_map(|h| self.by_host[*h as usize].iter().copied()).filter(|v| self.vms[*v as usize].running).collect()
    }

    /// Places the victims of `failed` on the surviving usable hosts. `off` VMs are never placed;
    /// with `protected_only`, best-effort VMs are skipped too (the FTT search).
    #[must_use]
    pub fn plan(&self, failed: &[u32], protected_only: bool) -> Plan {
        let victims = self.victims(failed);
        self.place(failed, victims, false, protected_only)
    }

    /// Places `to_place` (VMs not assigned anywhere, or victims of `failed`). `allow_off`: an
    /// operator start may place an `off` VM; a failover never does.
    #[must_use]
    pub fn place(&self, failed: &[u32], mut to_place: Vec<u32>, allow_off: bool, protected_only: bool) -> Plan {
        let n = self.hosts.len();
        let mut down = vec![false; n];
        for h in failed {
            down[*h as usize] = true;
        }
        // Which VMs move: needed only to tell staying rule members from moving ones.
        let any_rules = to_place.iter().any(|v| !self.vms[*v as usize].rules.is_empty());
        let mut moving = vec![false; if any_rules { self.vms.len() } else { 0 }];
        for v in to_place.iter().filter(|_| any_rules) {
            moving[*v as usize] = true;
        }
        let mut free: Vec<(u64, u64)> = (0..n)
            .map(|h| {
                let cap = &self.hosts[h];
                (cap.mem_mib.saturating_sub(self.used[h].0), cap.cpu_milli.saturating_sub(self.used[h].1))
            })
            .collect();
        // For each rule touched: the hosts its staying members occupy.
        let mut occupied: Vec<Vec<u32>> = vec![Vec::new(); self.rules.len()];
        let mut touched = vec![false; self.rules.len()];
        for v in &to_place {
            for r in &self.vms[*v as usize].rules {
                if !touched[*r as usize] {
                    touched[*r as usize] = true;
                    occupied[*r as usize] = self.rules[*r as usize]
                        .members
                        .iter()
                        .filter(|m| !moving[**m as usize] && self.vms[**m as usize].running)
                        .filter_map(|m| self.vms[*m as usize].host)
                        .filter(|h| !down[*h as usize])
                        .collect();
                }
            }
        }
        to_place.sort_unstable_by_key(|v| self.rank[*v as usize]);
        // Candidate hosts by free memory, most first (lowest id among equals). Entries go stale
        // when a host's free memory changes; a fresh one is pushed then, and stale ones are
        // dropped when they surface.
        let mut heap: std::collections::BinaryHeap<(u64, std::cmp::Reverse<u32>)> =
            (0..n).filter(|h| !down[*h] && self.hosts[*h].usable).map(|h| (free[h].0, std::cmp::Reverse(h as u32))).collect();
        let mut plan = Plan::default();
        for v in to_place {
            let vm = &self.vms[v as usize];
            if vm.protection == Protection::Off && !allow_off {
                plan.not_placed.push((v, NotPlaced::ProtectionOff));
                continue;
            }
            if protected_only && vm.protection != Protection::Protect {
                continue;
            }
            // (soft rules broken, host); `room_somewhere`: some host had the room.
            let (best, room_somewhere) = if vm.rules.iter().any(|r| !self.rules[*r as usize].hard) {
                self.best_by_scan(vm, &down, &free, &occupied)
            } else {
                best_from_heap(&mut heap, &free, |h| self.hard_allowed(vm, h, &occupied), vm)
            };
            match best {
                Some(h) => {
                    free[h as usize].0 -= vm.mem_mib;
                    free[h as usize].1 -= vm.cpu_milli;
                    heap.push((free[h as usize].0, std::cmp::Reverse(h)));
                    for r in &vm.rules {
                        let occ = &mut occupied[*r as usize];
                        if !occ.contains(&h) {
                            occ.push(h);
                        }
                    }
                    plan.placed.push((v, h));
                }
                None => plan.not_placed.push((v, if room_somewhere { NotPlaced::HardRule } else { NotPlaced::NoCapacity })),
            }
        }
        plan
    }

    fn hard_allowed(&self, vm: &PlacementVm, h: u32, occupied: &[Vec<u32>]) -> bool {
        vm.rules.iter().all(|r| {
            let rule = &self.rules[*r as usize];
            let occ = &occupied[*r as usize];
            !rule.hard
                || match rule.kind {
                    RuleKind::AntiAffinity => !occ.contains(&h),
                    RuleKind::Affinity => occ.first().is_none_or(|anchor| *anchor == h),
                    RuleKind::Site => rule.hosts.contains(&h),
                }
        })
    }

    /// Every host, for a VM with soft rules: fewest soft rules broken, then most free memory.
    fn best_by_scan(&self, vm: &PlacementVm, down: &[bool], free: &[(u64, u64)], occupied: &[Vec<u32>]) -> (Option<u32>, bool) {
        let mut best: Option<(u32, u64, u32)> = None;
        let mut room_somewhere = false;
        for h in 0..self.hosts.len() {
            if down[h] || !self.hosts[h].usable || free[h].0 < vm.mem_mib || free[h].1 < vm.cpu_milli || vm.avoid.contains(&(h as u32)) {
                continue;
            }
            room_somewhere = true;
            if !self.hard_allowed(vm, h as u32, occupied) {
                continue;
            }
            let soft = vm
                .rules
                .iter()
                .filter(|r| {
                    let rule = &self.rules[**r as usize];
                    let occ = &occupied[**r as usize];
                    !rule.hard
                        && match rule.kind {
                            RuleKind::AntiAffinity => occ.contains(&(h as u32)),
                            RuleKind::Affinity => occ.first().is_some_and(|anchor| *anchor != h as u32),
                            RuleKind::Site => !rule.hosts.contains(&(h as u32)),
                        }
                })
                .count() as u32;
            if best.is_none_or(|(bs, bf, _)| soft < bs || (soft == bs && free[h].0 > bf)) {
                best = Some((soft, free[h].0, h as u32));
            }
        }
        (best.map(|(_, _, h)| h), room_somewhere)
    }

    fn protected_down(&self, plan: &Plan) -> Vec<u32> {
        plan.not_placed.iter().filter(|(v, _)| self.vms[*v as usize].protection == Protection::Protect).map(|(v, _)| *v).collect()
    }

    /// The failures-to-tolerate search. Failure sets of size 1, 2, … are planned exhaustively
    /// while the number of sets stays within `budget`; past that the slot bound
    /// ([`Model::slot_bound`]) may raise the answer, as a lower bound.
    #[must_use]
    pub fn ftt(&self, budget: u64) -> FttReport {
        // A protected VM that cannot be placed even now, with every host up, survives no
        // failure: no plan exists (the established planners say so too), whatever the hosts.
        let waiting: Vec<u32> = (0..self.vms.len() as u32)
            .filter(|v| {
                let vm = &self.vms[*v as usize];
                vm.running && vm.host.is_none() && vm.protection == Protection::Protect
            })
            .collect();
        if !waiting.is_empty() {
            let stuck = self.protected_down(&self.place(&[], waiting, false, false));
            if !stuck.is_empty() {
                let names = stuck.iter().map(|v| self.vms[*v as usize].name.clone()).collect();
                return FttReport {
                    ftt: 0,
                    exact: true,
                    limited_by: FttLimit::Unplaceable,
                    checked_up_to: 0,
                    sets_checked: 0,
                    counterexample: Some((vec![], names)),
                };
            }
        }
        let up: Vec<u32> = (0..self.hosts.len() as u32).filter(|h| self.hosts[*h as usize].up).collect();
        let members = self.hosts.len() as u32;
        let already_down = members - up.len() as u32;
        // More failures than this and no majority is left to decide anything.
        let voters = members + self.extra_votes;
        let quorum_cap = ((voters.saturating_sub(1)) / 2).saturating_sub(already_down);
        let host_cap = (up.len() as u32).saturating_sub(1);
        let (cap, cap_reason) = if quorum_cap <= host_cap { (quorum_cap, FttLimit::Quorum) } else { (host_cap, FttLimit::Hosts) };
        let mut report = FttReport { ftt: 0, exact: true, limited_by: cap_reason, checked_up_to: 0, sets_checked: 0, counterexample: None };
        for k in 1..=cap {
            let sets = binomial(up.len() as u64, u64::from(k));
            if report.sets_checked.saturating_add(sets) > budget {
                let bound = self.slot_bound(cap);
                report.exact = false;
                report.limited_by = FttLimit::SearchBudget;
                report.ftt = report.checked_up_to.max(bound);
                return report;
            }
            let mut idx: Vec<usize> = (0..k as usize).collect();
            loop {
                let failed: Vec<u32> = idx.iter().map(|i| up[*i]).collect();
                let plan = self.plan(&failed, true);
                report.sets_checked += 1;
                let down = self.protected_down(&plan);
                if !down.is_empty() {
                    report.ftt = k - 1;
                    report.limited_by = FttLimit::Capacity;
                    report.counterexample =
                        Some((failed.iter().map(|h| self.hosts[*h as usize].id).collect(), down.iter().map(|v| self.vms[*v as usize].name.clone()).collect()));
                    return report;
                }
                // Next k-combination of the up hosts.
                let mut i = k as usize;
                while i > 0 && idx[i - 1] == up.len() - k as usize + i - 1 {
                    i -= 1;
                }
                if i == 0 {
                    break;
                }
                idx[i - 1] += 1;
                for j in i..k as usize {
                    idx[j] = idx[j - 1] + 1;
                }
            }
            report.checked_up_to = k;
            report.ftt = k;
        }
        report
    }

    /// A lower bound on FTT without enumerating failure sets, valid when no hard rule involves
    /// a protected VM (otherwise 0). Every protected VM fits in a "slot" of the largest
    /// protected VM's size; a host's slots are how many such slots its free room holds. A
    /// placement only ever uses one slot per VM, so if the slots left after losing the `k`
    /// hosts with the most slots still outnumber the protected VMs on the `k` hosts with the
    /// most of them, any `k` failures are survived.
    #[must_use]
    pub fn slot_bound(&self, cap: u32) -> u32 {
        let protected = |v: &PlacementVm| v.protection == Protection::Protect && v.running && v.host.is_some();
        let hard_rule = self.rules.iter().any(|r| r.hard && r.members.iter().any(|m| protected(&self.vms[*m as usize])));
        if hard_rule {
            return 0;
        }
        let (mut smax_m, mut smax_c) = (1u64, 1u64);
        let mut count = vec![0u64; self.hosts.len()];
        for v in self.vms.iter().filter(|v| protected(v)) {
            smax_m = smax_m.max(v.mem_mib);
            smax_c = smax_c.max(v.cpu_milli);
            if let Some(h) = v.host {
                count[h as usize] += 1;
            }
        }
        let mut slots: Vec<u64> = (0..self.hosts.len())
            .filter(|h| self.hosts[*h].up)
            .map(|h| {
                if !self.hosts[h].usable {
                    return 0;
                }
                let fm = self.hosts[h].mem_mib.saturating_sub(self.used[h].0);
                let fc = self.hosts[h].cpu_milli.saturating_sub(self.used[h].1);
                (fm / smax_m).min(fc / smax_c)
            })
            .collect();
        let mut counts: Vec<u64> = (0..self.hosts.len()).filter(|h| self.hosts[*h].up).map(|h| count[h]).collect();
        slots.sort_unstable_by(|a, b| b.cmp(a));
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let total: u64 = slots.iter().sum();
        let mut ok = 0;
        let (mut lost, mut displaced) = (0u64, 0u64);
        for k in 1..=cap.min(slots.len() as u32) {
            lost += slots[k as usize - 1];
            displaced += counts[k as usize - 1];
            if total - lost >= displaced {
                ok = k;
            } else {
                break;
            }
        }
        ok
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn host(i: u32, mem: u64, vcpus: u64) -> PlacementHost {
        PlacementHost { id: HostId(i), mem_mib: mem, cpu_milli: vcpus * 1000, up: true, usable: true }
    }

    pub(crate) fn vm(name: &str, mem: u64, vcpus: u64, on: u32) -> PlacementVm {
        PlacementVm {
            name: name.into(),
            mem_mib: mem,
            cpu_milli: vcpus * 1000,
            protection: Protection::Protect,
            priority: 0,
            host: Some(on),
            running: true,
            rules: vec![],
            avoid: vec![],
        }
    }

    fn with_rules(mut vms: Vec<PlacementVm>, rules: Vec<PlacementRule>) -> (Vec<PlacementVm>, Vec<PlacementRule>) {
        for (r, rule) in rules.iter().enumerate() {
            for m in &rule.members {
                vms[*m as usize].rules.push(r as u32);
            }
        }
        (vms, rules)
    }

    /// Three equal hosts, each half full: one failure is survived (its VMs fit on the other
    /// two), two are not.
    #[test]
    fn three_half_full_hosts_tolerate_one_failure() {
        let hosts = (0..3).map(|i| host(i, 1000, 8)).collect();
        let vms = (0..6).map(|i| vm(&format!("v{i}"), 250, 1, i % 3)).collect();
        let m = Model::new(hosts, vms, vec![]);
        let r = m.ftt(DEFAULT_FTT_BUDGET);
        // Quorum caps three hosts at one failure anyway.
        assert_eq!((r.ftt, r.exact, r.limited_by), (1, true, FttLimit::Quorum));
        let five = Model::new((0..5).map(|i| host(i, 1000, 8)).collect(), (0..10).map(|i| vm(&format!("v{i}"), 300, 1, i % 5)).collect(), vec![]);
        let r = five.ftt(DEFAULT_FTT_BUDGET);
        // Two failures displace 4 × 300 MiB; the three survivors have 400 MiB free each, one
        // 300 MiB VM each: only 3 of the 4 fit.
        assert_eq!((r.ftt, r.limited_by), (1, FttLimit::Capacity));
        let (set, down) = r.counterexample.expect("counterexample");
        assert_eq!((set.len(), down.len()), (2, 1));
    }

    /// Heterogeneous hosts with one VM much larger than the rest: the big VM fits only on the
    /// big host, so losing the big host's peer that holds it matters, and memory in total is
    /// not enough to tell.
    #[test]
    fn one_large_vm_needs_the_one_large_host() {
        let hosts = vec![host(0, 64_000, 32), host(1, 8_000, 8), host(2, 8_000, 8), host(3, 8_000, 8), host(4, 8_000, 8)];
        let mut vms = vec![vm("db", 40_000, 16, 0)];
        vms.extend((0..8).map(|i| vm(&format!("web{i}"), 1_000, 1, 1 + i % 4)));
        let m = Model::new(hosts, vms, vec![]);
        let r = m.ftt(DEFAULT_FTT_BUDGET);
        assert_eq!(r.ftt, 0, "if host 0 dies, 'db' (40 GiB) fits nowhere: {r:?}");
        assert_eq!(r.counterexample, Some((vec![HostId(0)], vec!["db".to_string()])));
        // The plan for host 0's failure shows it.
        let plan = m.plan(&[0], false);
        assert_eq!(plan.not_placed, vec![(0, NotPlaced::NoCapacity)]);
    }

    /// An anti-affinity pair on a 3-host cluster: when one member's host dies, the member must
    /// not land next to the other.
    #[test]
    fn hard_anti_affinity_pair_never_shares_a_host() {
        let hosts = (0..3).map(|i| host(i, 4000, 8)).collect();
        let vms = vec![vm("dns1", 500, 1, 0), vm("dns2", 500, 1, 1), vm("other", 3000, 1, 2)];
        let rule = PlacementRule { name: "dns-apart".into(), kind: RuleKind::AntiAffinity, hard: true, members: vec![0, 1], hosts: vec![] };
        let (vms, rules) = with_rules(vms, vec![rule]);
        let m = Model::new(hosts, vms, rules);
        // Host 2 has less free memory than host 1, but host 1 holds dns2.
        let plan = m.plan(&[0], false);
        assert_eq!(plan.placed, vec![(0, 2)]);
        // With host 2 full, dns1 stays down rather than break the rule.
        let full = Model::new(
            (0..3).map(|i| host(i, 4000, 8)).collect(),
            m.vms
                .iter()
                .cloned()
                .map(|mut v| {
                    if v.name == "other" {
                        v.mem_mib = 3800;
                    }
                    v
                })
                .collect(),
            m.rules.clone(),
        );
        assert_eq!(full.plan(&[0], false).not_placed, vec![(0, NotPlaced::HardRule)]);
        assert_eq!(full.ftt(DEFAULT_FTT_BUDGET).ftt, 0);
    }

    #[test]
    fn soft_affinity_is_preferred_but_not_required() {
        let hosts = (0..3).map(|i| host(i, 4000, 8)).collect();
        let vms = vec![vm("app", 500, 1, 0), vm("cache", 500, 1, 1), vm("filler", 100, 1, 2)];
        let rule = PlacementRule { name: "app-near-cache".into(), kind: RuleKind::Affinity, hard: false, members: vec![0, 1], hosts: vec![] };
        let (vms, rules) = with_rules(vms, vec![rule]);
        let m = Model::new(hosts, vms, rules);
        assert_eq!(m.plan(&[0], false).placed, vec![(0, 1)], "next to its cache, although host 2 has more room");
        // Fail the cache's host instead: cache goes next to app.
        assert_eq!(m.plan(&[1], false).placed, vec![(1, 0)]);
    }

    #[test]
    fn protected_before_best_effort_and_off_never() {
        let hosts = vec![host(0, 1000, 8), host(1, 600, 8)];
        let mut be = vm("be", 300, 1, 0);
        be.protection = Protection::BestEffort;
        be.priority = 100;
        let mut off = vm("off", 10, 1, 0);
        off.protection = Protection::Off;
        let vms = vec![be, vm("p", 400, 1, 0), off];
        let m = Model::new(hosts, vms, vec![]);
        let plan = m.plan(&[0], false);
        assert_eq!(plan.placed, vec![(1, 1)], "the protected VM first");
        assert!(plan.not_placed.contains(&(0, NotPlaced::NoCapacity)));
        assert!(plan.not_placed.contains(&(2, NotPlaced::ProtectionOff)));
    }

    fn arb_model() -> impl Strategy<Value = Model> {
        (3usize..8, 1usize..30).prop_flat_map(|(nh, nv)| {
            (
                proptest::collection::vec((1u64..8, 1u64..16), nh),
                proptest::collection::vec((1u64..4, 1u64..4, 0usize..nh, 0u8..3, -2i32..3), nv),
                proptest::collection::vec((proptest::collection::vec(0usize..nv, 2..4), any::<bool>(), any::<bool>()), 0..3),
            )
                .prop_map(move |(hs, vs, rs)| {
                    let hosts = hs.iter().enumerate().map(|(i, (m, c))| host(i as u32, m * 1000, *c)).collect();
                    let vms = vs
                        .iter()
                        .enumerate()
                        .map(|(i, (m, c, h, p, prio))| {
                            let mut v = vm(&format!("v{i}"), m * 400, *c, *h as u32);
                            v.protection = [Protection::Protect, Protection::BestEffort, Protection::Off][*p as usize];
                            v.priority = *prio;
                            v
                        })
                        .collect();
                    let rules = rs
                        .iter()
                        .enumerate()
                        .map(|(i, (members, anti, hard))| {
                            let mut members = members.iter().map(|m| *m as u32).collect::<Vec<_>>();
                            members.sort_unstable();
                            members.dedup();
                            PlacementRule {
                                name: format!("r{i}"),
                                kind: if *anti { RuleKind::AntiAffinity } else { RuleKind::Affinity },
                                hard: *hard,
                                members,
                                hosts: vec![],
                            }
                        })
                        .collect();
                    let (vms, rules) = with_rules(vms, rules);
                    Model::new(hosts, vms, rules)
                })
        })
    }

    proptest! {
        /// A plan never overfills a host and never breaks a hard rule that held before it.
        #[test]
        fn plans_respect_capacity_and_hard_rules(m in arb_model(), f in 0usize..8) {
            let failed = vec![(f % m.hosts.len()) as u32];
            let plan = m.plan(&failed, false);
            let mut used = m.used.clone();
            let mut host_of: Vec<Option<u32>> = m.vms.iter().map(|v| v.host).collect();
            for v in m.victims(&failed) {
                let vm = &m.vms[v as usize];
                used[vm.host.unwrap_or(0) as usize].0 -= vm.mem_mib;
                used[vm.host.unwrap_or(0) as usize].1 -= vm.cpu_milli;
                host_of[v as usize] = None;
            }
            for (v, h) in &plan.placed {
                prop_assert!(!failed.contains(h));
                let vm = &m.vms[*v as usize];
                used[*h as usize].0 += vm.mem_mib;
                used[*h as usize].1 += vm.cpu_milli;
                host_of[*v as usize] = Some(*h);
            }
            for (h, (mem, cpu)) in used.iter().enumerate() {
                if failed.contains(&(h as u32)) { continue; }
                let before = m.used[h];
                // A host that was already over (random input) may not get fuller.
                prop_assert!(*mem <= m.hosts[h].mem_mib.max(before.0) && *cpu <= m.hosts[h].cpu_milli.max(before.1));
            }
            let victims = m.victims(&failed);
            for rule in m.rules.iter().filter(|r| r.hard) {
                let running = |o: &&u32| m.vms[**o as usize].running;
                let staying: Vec<u32> = rule.members.iter().filter(running).filter(|o| !victims.contains(o)).filter_map(|o| m.vms[*o as usize].host).filter(|h| !failed.contains(h)).collect();
                let placed: Vec<u32> = plan.placed.iter().filter(|(v, _)| rule.members.contains(v)).map(|(_, h)| *h).collect();
                match rule.kind {
                    RuleKind::AntiAffinity => {
                        for (i, h) in placed.iter().enumerate() {
                            prop_assert!(!staying.contains(h) && !placed[..i].contains(h), "anti-affinity {} broken", rule.name);
                        }
                    }
                    RuleKind::Affinity => {
                        let anchor = staying.first().or(placed.first());
                        prop_assert!(placed.iter().all(|h| Some(h) == anchor), "affinity {} broken", rule.name);
                    }
                    RuleKind::Site => prop_assert!(placed.iter().all(|h| rule.hosts.contains(h)), "site rule {} broken", rule.name),
                }
            }
        }

        /// When FTT says k failures are survived, every failure set of size ≤ k restarts every
        /// protected VM; and the slot bound never exceeds the exact answer.
        #[test]
        fn ftt_is_sound_and_the_bound_never_overstates(m in arb_model()) {
            let r = m.ftt(u64::MAX);
            prop_assert!(r.exact);
            let up: Vec<u32> = (0..m.hosts.len() as u32).collect();
            for k in 1..=r.ftt as usize {
                for mask in 0u32..(1 << up.len()) {
                    if mask.count_ones() as usize != k { continue; }
                    let failed: Vec<u32> = up.iter().copied().filter(|h| mask & (1 << h) != 0).collect();
                    let plan = m.plan(&failed, true);
                    prop_assert!(m.protected_down(&plan).is_empty(), "ftt {} but {:?} leaves protected VMs down", r.ftt, failed);
                }
            }
            let members = m.hosts.len() as u32;
            prop_assert!(m.slot_bound((members - 1) / 2) <= r.ftt);
        }
    }
}
