//! Rebalancing, sans I/O: the live migrations that remove violations of placement rules and even
//! out memory use across the hosts.
//!
//! The plan is computed on a copy of committed state in which each planned move has already
//! happened, so every step sees the room and the rule members the earlier ones moved. Rules come
//! first (hard, then soft, by name): an anti-affinity rule keeps on each host the member of
//! highest priority and moves the others to hosts holding no member; an affinity rule gathers its
//! members on the host that already has most of them (the roomiest on a tie) or, failing that,
//! on any host that can take them all. Then memory: while the most and the least used hosts (in
//! percent of their memory) are more than [`BALANCE_TOLERANCE_PCT`] apart, the VM whose move
//! narrows that gap most moves from the one to the other — never a VM that a rule ties to its
//! host, that is migrating, or that an evacuation will take home, nor a VM whose disks are
//! mirrored between sites to another site (rules may take one there; memory does not). Every
//! target passes the same checks as any migration (active, normal mode, room, hard rules), and
//! the plan has at most [`MAX_REBALANCE_MOVES`] moves. Carrying it out is the caller's: one live
//! migration per move, each judged again by the cluster when it is asked for.

use crate::hostset::HostId;
use crate::placement::RuleKind;
use crate::state::{ClusterState, HostMode, HostStatus, Rule, VmPhase};

/// The most moves one plan proposes.
pub const MAX_REBALANCE_MOVES: usize = 64;
/// Hosts whose memory use (percent of their memory) is at most this far apart count as even.
pub const BALANCE_TOLERANCE_PCT: u64 = 10;

/// Why a VM moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MoveReason {
    /// It breaks this rule where it is.
    Rule(String),
    /// Its host uses more memory than the others.
    Balance,
}

/// One live migration of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebalanceMove {
    pub vm: String,
    pub from: HostId,
    pub to: HostId,
    pub reason: MoveReason,
}

/// A violation the plan cannot remove, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unfixable {
    pub rule: String,
    pub vm: String,
    pub why: String,
}

/// What to rebalance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebalanceScope {
    /// Only this rule's violations (`None`: every rule's).
    pub rule: Option<String>,
    /// Even out memory use too.
    pub balance: bool,
}

/// The plan, and the spread of memory use before and after it (percentage points between the
/// most and the least used host in normal mode).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebalancePlan {
    pub moves: Vec<RebalanceMove>,
    pub unfixable: Vec<Unfixable>,
    pub spread_before_pct: u64,
    pub spread_after_pct: u64,
}

/// Hosts that may send and receive VMs: active, in normal mode.
fn usable_hosts(s: &ClusterState) -> Vec<HostId> {
    s.hosts.values().filter(|h| h.status == HostStatus::Active && h.mode == HostMode::Normal).map(|h| h.id).collect()
}

/// Basis points (hundredths of a percent): fine enough that moving a small VM off a big host
/// still shows.
const BP: u64 = 10_000;

/// Memory used on `h`, in basis points of its memory.
fn used_bp(s: &ClusterState, h: HostId) -> u64 {
    let cap = s.hosts.get(&h).map_or(0, |r| r.capacity.memory_mib);
    (s.used(h).memory_mib * BP).checked_div(cap).unwrap_or(0)
}

/// Percentage points between the most and the least used usable host.
fn spread(s: &ClusterState) -> u64 {
    let used: Vec<u64> = usable_hosts(s).into_iter().map(|h| used_bp(s, h)).collect();
    (used.iter().max().copied().unwrap_or(0) - used.iter().min().copied().unwrap_or(0)) / (BP / 100)
}

/// Where `vm` runs, if it is placed and not migrating.
fn settled_at(s: &ClusterState, vm: &str) -> Option<HostId> {
    match s.vms.get(vm)?.phase {
        VmPhase::Placed { at } => Some(at.host),
        _ => None,
    }
}

/// Moves `vm` to `to` on the planning copy (the migration begins and completes).
fn move_on_copy(plan: &mut ClusterState, vm: &str, to: HostId) -> bool {
    let started = plan.apply(&plan.start_migration_command(vm, to, true, false));
    let Ok(crate::state::Applied::MigrationStarted { to: at, .. }) = started else { return false };
    plan.apply(&plan.switchover_command(vm, at.generation)).is_ok()
}

/// Whether `vm` may go to `to` as far as `rule` is concerned (hard rules are also checked by the
/// migration's own checks; this covers soft ones).
fn rule_allows(plan: &ClusterState, rule: &Rule, vm: &str, to: HostId) -> bool {
    let others = rule.vms.iter().filter(|m| *m != vm).filter_map(|m| plan.vms.get(m).and_then(|v| v.assignment()).map(|a| a.host));
    match rule.kind {
        RuleKind::AntiAffinity => others.into_iter().all(|h| h != to),
        RuleKind::Affinity => true,
        RuleKind::Site => in_site(plan, rule, to),
    }
}

/// Whether `host` is in the site of a site rule.
fn in_site(plan: &ClusterState, rule: &Rule, host: HostId) -> bool {
    plan.hosts.get(&host).is_some_and(|h| h.site.is_some() && h.site == rule.site)
}

/// Members of a site rule running outside its site move to the roomiest host of the site, one
/// by one, as long as one may take them.
fn fix_site(plan: &mut ClusterState, rule: &Rule, out: &mut RebalancePlan) {
    let outside: Vec<(String, HostId)> = rule
        .vms
        .iter()
        .filter_map(|m| plan.vms.get(m).and_then(|v| v.assignment()).map(|a| (m.clone(), a.host)))
        .filter(|(_, h)| !in_site(plan, rule, *h))
        .collect();
    for (vm, from) in outside {
        let why = if settled_at(plan, &vm).is_none() {
            Some("it is migrating".to_string())
        } else {
            match roomiest(plan, &vm, usable_hosts(plan).into_iter().filter(|h| in_site(plan, rule, *h))) {
                Some(to) if out.moves.len() < MAX_REBALANCE_MOVES && move_on_copy(plan, &vm, to) => {
                    out.moves.push(RebalanceMove { vm: vm.clone(), from, to, reason: MoveReason::Rule(rule.name.clone()) });
                    None
                }
                Some(_) => Some("the plan is already as long as it may be".to_string()),
                None => Some(format!("no host of site {} may take it", rule.site.as_deref().unwrap_or_default())),
            }
        };
        if let Some(why) = why {
            out.unfixable.push(Unfixable { rule: rule.name.clone(), vm, why });
        }
    }
}

/// The roomiest host (most free memory, then lowest id) among `hosts` that may take `vm` — for
/// a VM with disks mirrored between sites, one of its own site first (see
/// [`ClusterState::keeps_site`]).
fn roomiest(plan: &ClusterState, vm: &str, hosts: impl Iterator<Item = HostId>) -> Option<HostId> {
    hosts.filter(|h| plan.may_take(vm, *h)).max_by_key(|h| {
        (plan.keeps_site(vm, *h), plan.hosts.get(h).map_or(0, |r| r.capacity.memory_mib).saturating_sub(plan.used(*h).memory_mib), std::cmp::Reverse(*h))
    })
}

fn fix_anti_affinity(plan: &mut ClusterState, rule: &Rule, out: &mut RebalancePlan) {
    let mut members: Vec<(String, HostId, i32)> =
        rule.vms.iter().filter_map(|m| plan.vms.get(m).and_then(|v| v.assignment().map(|a| (m.clone(), a.host, v.spec.priority)))).collect();
    // Higher priority keeps its place.
    members.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(&b.0)));
    let mut kept: Vec<HostId> = Vec::new();
    for (vm, host, _) in members {
        if !kept.contains(&host) {
            kept.push(host);
            continue;
        }
        let why = if settled_at(plan, &vm).is_none() {
            Some("it is migrating".to_string())
        } else {
            let target = roomiest(plan, &vm, usable_hosts(plan).into_iter().filter(|h| rule_allows(plan, rule, &vm, *h)));
            match target {
                Some(to) if out.moves.len() < MAX_REBALANCE_MOVES && move_on_copy(plan, &vm, to) => {
                    out.moves.push(RebalanceMove { vm: vm.clone(), from: host, to, reason: MoveReason::Rule(rule.name.clone()) });
                    kept.push(to);
                    None
                }
                Some(_) => Some("the plan is already as long as it may be".to_string()),
                None => Some("no host without another member of the rule may take it".to_string()),
            }
        };
        if let Some(why) = why {
            out.unfixable.push(Unfixable { rule: rule.name.clone(), vm, why });
        }
    }
}

fn fix_affinity(plan: &mut ClusterState, rule: &Rule, out: &mut RebalancePlan) {
    let placed: Vec<(String, HostId)> = rule.vms.iter().filter_map(|m| plan.vms.get(m).and_then(|v| v.assignment()).map(|a| (m.clone(), a.host))).collect();
    let Some(first) = placed.first().map(|p| p.1) else { return };
    if placed.iter().all(|(_, h)| *h == first) {
        return;
    }
    // Hosts by how many members they already have, then by free memory.
    let mut hosts = usable_hosts(plan);
    let free = |p: &ClusterState, h: HostId| p.hosts.get(&h).map_or(0, |r| r.capacity.memory_mib).saturating_sub(p.used(h).memory_mib);
    hosts.sort_by_key(|h| (std::cmp::Reverse(placed.iter().filter(|(_, g)| g == h).count()), std::cmp::Reverse(free(plan, *h)), *h));
    for target in hosts {
        let movers: Vec<&(String, HostId)> = placed.iter().filter(|(_, h)| *h != target).collect();
        if movers.iter().any(|(vm, _)| settled_at(plan, vm).is_none()) || out.moves.len() + movers.len() > MAX_REBALANCE_MOVES {
            continue;
        }
        let mut trial = plan.clone();
        if movers.iter().all(|(vm, _)| move_on_copy(&mut trial, vm, target)) {
            *plan = trial;
            out.moves.extend(movers.into_iter().map(|(vm, from)| RebalanceMove {
                vm: vm.clone(),
                from: *from,
                to: target,
                reason: MoveReason::Rule(rule.name.clone()),
            }));
            return;
        }
    }
    for (vm, _) in placed.iter().filter(|(_, h)| *h != first) {
        out.unfixable.push(Unfixable { rule: rule.name.clone(), vm: vm.clone(), why: "no host can take every member of the rule".into() });
    }
}

/// Whether a rule ties `vm` to where it is (any affinity rule; balancing moves VMs one at a
/// time and would break it).
fn tied(s: &ClusterState, vm: &str) -> bool {
    s.rules.values().any(|r| r.kind == RuleKind::Affinity && r.vms.iter().any(|m| m == vm))
}

/// One balancing move: from the most used host to the least used, the VM that narrows their
/// gap most, if the gap exceeds the tolerance and some move narrows it.
fn balance_step(plan: &ClusterState) -> Option<(String, HostId, HostId)> {
    let hosts = usable_hosts(plan);
    let hi = hosts.iter().copied().max_by_key(|h| (used_bp(plan, *h), std::cmp::Reverse(*h)))?;
    let lo = hosts.iter().copied().min_by_key(|h| (used_bp(plan, *h), *h))?;
    let gap = used_bp(plan, hi).saturating_sub(used_bp(plan, lo));
    if hi == lo || gap <= BALANCE_TOLERANCE_PCT * (BP / 100) {
        return None;
    }
    let cap = |h: HostId| plan.hosts.get(&h).map_or(0, |r| r.capacity.memory_mib).max(1);
    let after = |mem: u64| {
        let a = (plan.used(hi).memory_mib.saturating_sub(mem) * BP) / cap(hi);
        let b = ((plan.used(lo).memory_mib + mem) * BP) / cap(lo);
        a.abs_diff(b)
    };
    plan.assigned_to(hi)
        .filter(|v| settled_at(plan, &v.spec.name) == Some(hi) && v.home.is_none() && !tied(plan, &v.spec.name))
        .filter(|v| plan.rules.values().filter(|r| r.vms.contains(&v.spec.name)).all(|r| rule_allows(plan, r, &v.spec.name, lo)))
        // Memory alone never takes a mirrored VM to another site (its copy left behind).
        .filter(|v| after(v.spec.memory_mib) < gap && plan.keeps_site(&v.spec.name, lo) && plan.may_take(&v.spec.name, lo))
        .min_by_key(|v| (after(v.spec.memory_mib), v.spec.name.clone()))
        .map(|v| (v.spec.name.clone(), hi, lo))
}

/// The plan for `scope` on committed state `s`.
#[must_use]
pub fn rebalance_plan(s: &ClusterState, scope: &RebalanceScope) -> RebalancePlan {
    let mut plan = s.clone();
    let mut out = RebalancePlan { moves: vec![], unfixable: vec![], spread_before_pct: spread(s), spread_after_pct: 0 };
    let mut rules: Vec<Rule> = s.rules.values().filter(|r| scope.rule.as_ref().is_none_or(|only| *only == r.name)).cloned().collect();
    rules.sort_by(|a, b| b.hard.cmp(&a.hard).then_with(|| a.name.cmp(&b.name)));
    for rule in &rules {
        match rule.kind {
            RuleKind::AntiAffinity => fix_anti_affinity(&mut plan, rule, &mut out),
            RuleKind::Affinity => fix_affinity(&mut plan, rule, &mut out),
            RuleKind::Site => fix_site(&mut plan, rule, &mut out),
        }
    }
    if scope.balance {
        while out.moves.len() < MAX_REBALANCE_MOVES {
            let Some((vm, from, to)) = balance_step(&plan) else { break };
            if !move_on_copy(&mut plan, &vm, to) {
                break;
            }
            out.moves.push(RebalanceMove { vm, from, to, reason: MoveReason::Balance });
        }
    }
    out.spread_after_pct = spread(&plan);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cluster, process_vm, run_on};
    use crate::state::{Command, Protection};

    fn all() -> RebalanceScope {
        RebalanceScope { rule: None, balance: true }
    }

    fn rule(s: &mut ClusterState, name: &str, kind: RuleKind, hard: bool, vms: &[&str]) {
        let r = Rule { name: name.into(), kind, hard, vms: vms.iter().map(|v| (*v).to_string()).collect(), site: None };
        s.apply(&Command::SetRule { rule: r, force: true }).expect("rule");
    }

    /// Carries the plan out on `s` as the cluster would, move by move.
    fn carry_out(s: &mut ClusterState, plan: &RebalancePlan) {
        for m in &plan.moves {
            assert!(move_on_copy(s, &m.vm, m.to), "{m:?}");
        }
    }

    fn host_of(s: &ClusterState, vm: &str) -> HostId {
        s.vms[vm].assignment().expect("placed").host
    }

    /// Two hosts at two sites, the first crowded: memory moves a plain VM to the other site,
    /// never one whose disks are mirrored between the sites (its copy would be left behind),
    /// even one whose copy there is current.
    #[test]
    fn memory_alone_never_moves_a_mirrored_vm_to_another_site() {
        let mut s = cluster(2, 4096);
        for (h, site) in [(0, "a"), (1, "b")] {
            s.apply(&Command::SetHostSite { host: HostId(h), site: Some(site.into()) }).expect("site");
        }
        let mut db = process_vm("db", Protection::Protect, 0, 2048);
        db.disks = vec![crate::state::DiskSpec { path: "db.raw".into(), format: None, readonly: false, local: false, mirror: true }];
        run_on(&mut s, db, 0);
        let g = s.vms["db"].assignment().expect("placed").generation;
        s.apply(&Command::MirrorSynced { name: "db".into(), generation: g, site: "b".into() }).expect("synced");
        run_on(&mut s, process_vm("web", Protection::Protect, 0, 1536), 0);
        assert!(s.may_take("db", HostId(1)), "a move to b is allowed (its copy there is current)");
        // Either move evens the hosts as well; by name `db` would go first.
        let plan = rebalance_plan(&s, &all());
        assert_eq!(plan.moves.iter().map(|m| m.vm.as_str()).collect::<Vec<_>>(), ["web"], "{plan:?}");
    }

    #[test]
    fn anti_affinity_violations_move_the_lower_priority_member_away() {
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("db1", Protection::Protect, 5, 512), 0);
        run_on(&mut s, process_vm("db2", Protection::Protect, 1, 512), 0);
        run_on(&mut s, process_vm("db3", Protection::Protect, 3, 512), 0);
        rule(&mut s, "apart", RuleKind::AntiAffinity, false, &["db1", "db2", "db3"]);
        let plan = rebalance_plan(&s, &RebalanceScope { rule: Some("apart".into()), balance: false });
        assert!(plan.unfixable.is_empty(), "{plan:?}");
        assert_eq!(plan.moves.iter().map(|m| m.vm.as_str()).collect::<Vec<_>>(), ["db3", "db2"], "db1 (priority 5) stays");
        assert!(plan.moves.iter().all(|m| m.reason == MoveReason::Rule("apart".into()) && m.from == HostId(0)));
        carry_out(&mut s, &plan);
        let hosts: std::collections::BTreeSet<HostId> = ["db1", "db2", "db3"].iter().map(|v| host_of(&s, v)).collect();
        assert_eq!(hosts.len(), 3, "one member per host");
        assert!(rebalance_plan(&s, &all()).moves.iter().all(|m| m.reason == MoveReason::Balance), "nothing left to fix");
    }

    #[test]
    fn affinity_gathers_members_where_most_of_them_are_or_says_why_not() {
        let mut s = cluster(3, 2048);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 256), 1);
        run_on(&mut s, process_vm("b", Protection::Protect, 0, 256), 1);
        run_on(&mut s, process_vm("c", Protection::Protect, 0, 256), 2);
        rule(&mut s, "together", RuleKind::Affinity, false, &["a", "b", "c"]);
        let plan = rebalance_plan(&s, &RebalanceScope { rule: None, balance: false });
        assert_eq!(plan.moves, vec![RebalanceMove { vm: "c".into(), from: HostId(2), to: HostId(1), reason: MoveReason::Rule("together".into()) }]);
        // Too big to gather anywhere: reported, nothing moved for it.
        let mut s = cluster(2, 1024);
        run_on(&mut s, process_vm("x", Protection::Protect, 0, 768), 0);
        run_on(&mut s, process_vm("y", Protection::Protect, 0, 768), 1);
        rule(&mut s, "pair", RuleKind::Affinity, false, &["x", "y"]);
        let plan = rebalance_plan(&s, &RebalanceScope { rule: None, balance: false });
        assert!(plan.moves.is_empty());
        assert_eq!(plan.unfixable.len(), 1, "{plan:?}");
        assert!(plan.unfixable[0].why.contains("every member"));
    }

    #[test]
    fn memory_evens_out_within_the_tolerance_and_stops() {
        let mut s = cluster(3, 4096);
        for i in 0..6 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 512), 0);
        }
        let plan = rebalance_plan(&s, &all());
        assert_eq!(plan.spread_before_pct, 75);
        assert!(plan.spread_after_pct <= BALANCE_TOLERANCE_PCT, "{plan:?}");
        assert_eq!(plan.moves.len(), 4, "two VMs to each other host: {plan:?}");
        carry_out(&mut s, &plan);
        for h in 0..3 {
            assert_eq!(s.assigned_to(HostId(h)).count(), 2);
        }
        assert!(rebalance_plan(&s, &all()).moves.is_empty(), "an even cluster stays put");
    }

    #[test]
    fn balancing_never_breaks_a_rule_nor_uses_a_host_in_maintenance() {
        let mut s = cluster(3, 4096);
        for i in 0..4 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 512), 0);
        }
        run_on(&mut s, process_vm("w", Protection::Protect, 0, 512), 1);
        rule(&mut s, "tied", RuleKind::Affinity, true, &["v0", "v1"]);
        rule(&mut s, "apart", RuleKind::AntiAffinity, false, &["v2", "w"]);
        s.apply(&Command::SetHostMode { host: HostId(2), mode: HostMode::Maintenance, force: true }).expect("mode");
        let plan = rebalance_plan(&s, &all());
        for m in &plan.moves {
            assert_ne!(m.to, HostId(2), "a host in maintenance receives nothing");
            assert!(!["v0", "v1"].contains(&m.vm.as_str()), "affinity members stay together: {plan:?}");
            assert!(!(m.vm == "v2" && m.to == HostId(1)), "v2 may not join w: {plan:?}");
        }
        assert_eq!(plan.moves.iter().map(|m| m.vm.as_str()).collect::<Vec<_>>(), ["v3"], "{plan:?}");
    }

    #[test]
    fn the_plan_is_bounded() {
        let mut s = cluster(2, 16_384);
        for h in s.hosts.values_mut() {
            h.capacity.vcpus = 1000;
        }
        for i in 0..200 {
            run_on(&mut s, process_vm(&format!("v{i:03}"), Protection::Protect, 0, 64), 0);
        }
        let plan = rebalance_plan(&s, &all());
        assert_eq!(plan.moves.len(), MAX_REBALANCE_MOVES);
    }
}
