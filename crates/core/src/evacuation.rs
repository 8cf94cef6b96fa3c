//! Maintenance by live migration, sans I/O: which migrations the coordinator starts next so that
//! hosts in maintenance empty themselves and, once out of it, get their VMs back.
//!
//! The mode lives in committed state, so the plan is recomputed from it at every coordinator
//! tick (under any leader, after any restart): a host in `maintenance` sends its VMs away —
//! `protect` before `best-effort`, higher priority first — each to the host
//! [`ClusterState::migration_target`] picks (the one with the most free memory that may take it),
//! as fast as the migration bounds allow; a VM no host may take stays, with the reason. A VM an
//! evacuation moved remembers its `home`; when that host is active in normal mode again, the VM
//! migrates back (an operator's migration since has cleared its home, so it is left alone).
//!
//! A VM whose live migration off a host in maintenance, or back home, does not complete (it
//! cannot converge, its destination failed) is tried again, at most [`MAX_EVACUATION_ATTEMPTS`]
//! times while this coordinator leads ([`EvacuationAttempts`]); then it stays, with the reason,
//! rather than being migrated again and again. A new leader tries again (later, never more
//! often). A move back keeps the VM's home until its switchover, so a failed one is not lost.

use crate::hostset::HostId;
use crate::state::{
    ClusterState, Command, HostMode, HostStatus, Protection, VmPhase, MAX_CLUSTER_MIGRATIONS, MAX_INCOMING_MIGRATIONS, MAX_OUTGOING_MIGRATIONS,
};
use std::collections::BTreeMap;

/// How many live migrations of one VM off a host in maintenance (or back home) may fail before
/// the coordinator stops trying (each may take up to the migration's overall bound).
pub const MAX_EVACUATION_ATTEMPTS: u32 = 3;

/// What a coordinator remembers of the maintenance moves it started (evacuations and moves back
/// home): for each VM, the destination generation of the attempt under way and how many before
/// it did not complete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvacuationAttempts {
    tried: BTreeMap<String, Attempts>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Attempts {
    /// The destination generation of the attempt under way, if one is.
    running: Option<u64>,
    failed: u32,
    /// The move the failed attempts were for (a different one starts counting afresh).
    need: Option<Need>,
}

/// The maintenance move a VM has to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Leave this host, in maintenance.
    Leave(HostId),
    /// Go back to this home.
    Return(HostId),
}

/// The move `v`, placed on `at`, has to make now, if any.
fn need(s: &ClusterState, v: &crate::state::VmRecord, at: HostId) -> Option<Need> {
    if leaving(s, at) {
        return Some(Need::Leave(at));
    }
    returning(s, v).map(Need::Return)
}

impl EvacuationAttempts {
    /// The coordinator started a live migration of `vm` off its host in maintenance, or back
    /// home, to destination generation `generation`.
    pub fn started(&mut self, vm: &str, generation: u64) {
        self.tried.entry(vm.to_string()).or_default().running = Some(generation);
    }

    /// Looks at committed state: an attempt that is no longer under way while its VM still has
    /// to move (placed on a host in maintenance, or away from a home ready for it) did not
    /// complete; a VM that no longer has to (it moved, its host left maintenance, it stopped)
    /// is forgotten, and one that has to make another move (its return given up, the host it
    /// stays on enters maintenance) starts counting afresh.
    pub fn observe(&mut self, s: &ClusterState) {
        self.tried.retain(|vm, a| {
            let Some(v) = s.vms.get(vm) else { return false };
            match (&v.phase, a.running) {
                (VmPhase::Migrating { to, .. }, Some(g)) if to.generation == g => true,
                (VmPhase::Placed { at }, _) => match need(s, v, at.host) {
                    None => false,
                    Some(now) if a.need.is_some_and(|before| before != now) => {
                        *a = Attempts { need: Some(now), ..Attempts::default() };
                        true
                    }
                    Some(now) => {
                        a.need = Some(now);
                        if a.running.take().is_some() {
                            a.failed += 1;
                        }
                        true
                    }
                },
                _ => false,
            }
        });
    }

    /// The VMs given up on, with how many attempts failed.
    #[must_use]
    pub fn given_up(&self) -> BTreeMap<String, u32> {
        self.tried.iter().filter(|(_, a)| a.running.is_none() && a.failed >= MAX_EVACUATION_ATTEMPTS).map(|(vm, a)| (vm.clone(), a.failed)).collect()
    }
}

/// One migration to start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedMove {
    pub vm: String,
    pub to: HostId,
    /// Leaving a host in maintenance (true), or going back home (false).
    pub evacuation: bool,
}

impl PlannedMove {
    /// The command that starts it, on committed state `s`.
    #[must_use]
    pub fn command(&self, s: &ClusterState) -> Command {
        // Both kinds keep the VM's home: a move back forgets it only at its switchover.
        s.start_migration_command(&self.vm, self.to, true, true)
    }
}

/// A VM that cannot make its maintenance move now — leave its host in maintenance (no host may
/// take it, or its live migration kept failing) or go back home (it kept failing) — and why,
/// as a sentence's predicate ("cannot leave its host in maintenance: ...").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stuck {
    pub vm: String,
    pub why: String,
}

fn usable(s: &ClusterState, h: HostId) -> bool {
    s.hosts.get(&h).is_some_and(|r| r.status == HostStatus::Active)
}

/// Whether a VM placed on `host` leaves it: the host is active and in maintenance.
fn leaving(s: &ClusterState, host: HostId) -> bool {
    usable(s, host) && s.hosts.get(&host).is_some_and(|h| h.mode == HostMode::Maintenance)
}

/// The home `v` goes back to now: it is placed on an active host away from its home, which is
/// active and in normal mode.
fn returning(s: &ClusterState, v: &crate::state::VmRecord) -> Option<HostId> {
    let (VmPhase::Placed { at }, Some(home)) = (&v.phase, v.home) else { return None };
    let home_ready = s.hosts.get(&home).is_some_and(|h| h.status == HostStatus::Active && h.mode == HostMode::Normal);
    (at.host != home && home_ready && usable(s, at.host)).then_some(home)
}

/// Evacuations first (in the order they should go), then returns home.
fn candidates(s: &ClusterState) -> Vec<(String, Option<HostId>, bool)> {
    let mut leaving: Vec<&crate::state::VmRecord> = s
        .vms
        .values()
        .filter(|v| match v.phase {
            VmPhase::Placed { at } => leaving(s, at.host),
            _ => false,
        })
        .collect();
    leaving.sort_by_key(|v| {
        (v.spec.protection != Protection::Protect, std::cmp::Reverse(v.spec.priority), std::cmp::Reverse(v.spec.memory_mib), v.spec.name.clone())
    });
    let mut out: Vec<(String, Option<HostId>, bool)> = leaving.into_iter().map(|v| (v.spec.name.clone(), None, true)).collect();
    out.extend(s.vms.values().filter_map(|v| Some((v.spec.name.clone(), Some(returning(s, v)?), false))));
    out
}

/// The migrations to start now, within the bounds on migrations per host and in the cluster
/// (counting those already running), and the VMs of hosts in maintenance that cannot move.
#[must_use]
pub fn next_moves(s: &ClusterState) -> (Vec<PlannedMove>, Vec<Stuck>) {
    next_moves_except(s, &BTreeMap::new())
}

/// [`next_moves`], leaving out the VMs whose live migration the coordinator gave up on
/// (`given_up`, with the attempts that failed: see [`EvacuationAttempts`]), which are stuck.
#[must_use]
pub fn next_moves_except(s: &ClusterState, given_up: &BTreeMap<String, u32>) -> (Vec<PlannedMove>, Vec<Stuck>) {
    let mut out_of: BTreeMap<HostId, usize> = BTreeMap::new();
    let mut into: BTreeMap<HostId, usize> = BTreeMap::new();
    let mut total = 0;
    for (_, from, to) in s.migrations() {
        *out_of.entry(from.host).or_default() += 1;
        *into.entry(to.host).or_default() += 1;
        total += 1;
    }
    // Planned on a copy in which each planned move has begun: the room it holds counts.
    let mut plan = s.clone();
    let (mut moves, mut stuck) = (vec![], vec![]);
    for (vm, home, evacuation) in candidates(s) {
        if let Some(n) = given_up.get(&vm) {
            let why = match home {
                None => format!("cannot leave its host in maintenance: its live migration did not complete {n} times"),
                Some(h) => format!("stays away from its home {}: its live migration back did not complete {n} times", s.host_name(h)),
            };
            stuck.push(Stuck { vm, why });
            continue;
        }
        let Some(from) = plan.vms.get(&vm).and_then(|v| v.assignment()).map(|a| a.host) else { continue };
        let target = match home {
            Some(h) => plan.may_take(&vm, h).then_some(h),
            None => plan.migration_target(&vm),
        };
        let Some(to) = target else {
            if evacuation {
                let why = format!("cannot leave its host in maintenance: {}", no_live_target(s, &vm));
                stuck.push(Stuck { vm, why });
            }
            continue;
        };
        if total >= MAX_CLUSTER_MIGRATIONS
            || out_of.get(&from).copied().unwrap_or(0) >= MAX_OUTGOING_MIGRATIONS
            || into.get(&to).copied().unwrap_or(0) >= MAX_INCOMING_MIGRATIONS
        {
            continue;
        }
        if plan.begin_planned_migration(&vm, to).is_err() {
            continue;
        }
        *out_of.entry(from).or_default() += 1;
        *into.entry(to).or_default() += 1;
        total += 1;
        moves.push(PlannedMove { vm, to, evacuation });
    }
    (moves, stuck)
}

/// Why no host may take `vm` live now.
fn no_live_target(s: &ClusterState, vm: &str) -> String {
    if s.vms.get(vm).is_some_and(|v| v.spec.site_mirrored()) {
        return "its disks are mirrored between sites: it moves live to a host of its site, or of a site whose copy is current (its mirror in sync), and none may take it now".into();
    }
    crate::recovery::waiting_reason(s, vm, s.active_hosts()).unwrap_or_else(|| "no host may take it now".into())
}

/// Where each VM of `host` would go if it entered maintenance now (all of them, ignoring the
/// bounds on concurrent migrations, which only spread them over time): a host, or why none.
#[must_use]
pub fn evacuation_plan(s: &ClusterState, host: HostId) -> Vec<(String, Result<HostId, String>)> {
    let mut plan = s.clone();
    if let Some(h) = plan.hosts.get_mut(&host) {
        h.mode = HostMode::Maintenance;
    }
    let mut out = vec![];
    for (vm, _, evacuation) in candidates(&plan) {
        if !evacuation || plan.vms.get(&vm).and_then(|v| v.assignment()).map(|a| a.host) != Some(host) {
            continue;
        }
        match plan.migration_target(&vm) {
            Some(to) => {
                let _ = plan.begin_planned_migration(&vm, to);
                out.push((vm, Ok(to)));
            }
            None => {
                let why = no_live_target(&plan, &vm);
                out.push((vm, Err(why)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cluster, process_vm, run_on};
    use crate::state::Applied;

    fn maintenance(s: &mut ClusterState, h: u32, mode: HostMode) {
        s.apply(&Command::SetHostMode { host: HostId(h), mode, force: true }).expect("mode");
    }

    /// Play the coordinator: start the planned moves and complete them, until nothing is left.
    fn run_to_completion(s: &mut ClusterState) -> usize {
        let mut rounds = 0;
        loop {
            let (moves, _) = next_moves(s);
            if moves.is_empty() {
                return rounds;
            }
            rounds += 1;
            for m in moves {
                let out = s.apply(&m.command(s)).expect("start");
                let Applied::MigrationStarted { to, .. } = out else { panic!("{out:?}") };
                s.apply(&s.switchover_command(&m.vm, to.generation)).expect("switch");
            }
            assert!(rounds < 50, "evacuation must end");
        }
    }

    #[test]
    fn a_host_in_maintenance_empties_in_priority_order_within_the_bounds_and_gets_its_vms_back() {
        let mut s = cluster(3, 8192);
        for (i, prio) in [1, 5, 3, 9, 2].iter().enumerate() {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, *prio, 512), 0);
        }
        run_on(&mut s, process_vm("elsewhere", Protection::Protect, 0, 512), 1);
        maintenance(&mut s, 0, HostMode::Maintenance);
        let (first, stuck) = next_moves(&s);
        assert!(stuck.is_empty());
        assert_eq!(first.len(), MAX_OUTGOING_MIGRATIONS, "at most two leave one host at once");
        assert_eq!(first.iter().map(|m| m.vm.as_str()).collect::<Vec<_>>(), ["v3", "v1"], "highest priority first");
        assert!(first.iter().all(|m| m.evacuation && m.to != HostId(0)));
        run_to_completion(&mut s);
        assert_eq!(s.assigned_to(HostId(0)).count(), 0, "the host is empty");
        assert!(s.vms.values().filter(|v| v.spec.name.starts_with('v')).all(|v| v.home == Some(HostId(0))));
        // An operator moves one of them elsewhere: it forgets its home.
        let v0_at = s.vms["v0"].assignment().expect("placed").host;
        let other = if v0_at == HostId(1) { HostId(2) } else { HostId(1) };
        let out = s.apply(&Command::StartMigration { name: "v0".into(), to: other, force: true, evacuation: false, across_sites: false }).expect("operator");
        let Applied::MigrationStarted { to, .. } = out else { panic!() };
        s.apply(&s.switchover_command("v0", to.generation)).expect("switch");
        assert_eq!(s.vms["v0"].home, None);
        // Out of maintenance: the others come back, v0 stays where the operator put it.
        maintenance(&mut s, 0, HostMode::Normal);
        run_to_completion(&mut s);
        let back: Vec<&str> = s.assigned_to(HostId(0)).map(|v| v.spec.name.as_str()).collect();
        assert_eq!(back, ["v1", "v2", "v3", "v4"]);
        assert!(s.vms["v0"].assignment().is_some_and(|a| a.host == other));
        assert!(s.vms.values().all(|v| v.home.is_none()), "home is forgotten once back");
    }

    /// A VM whose evacuation keeps failing is tried `MAX_EVACUATION_ATTEMPTS` times, then
    /// reported stuck instead of planned again; leaving maintenance forgets the count.
    #[test]
    fn an_evacuation_that_keeps_failing_is_given_up_after_a_bounded_number_of_attempts() {
        let mut s = cluster(3, 8192);
        run_on(&mut s, process_vm("v", Protection::Protect, 0, 512), 0);
        maintenance(&mut s, 0, HostMode::Maintenance);
        let mut attempts = EvacuationAttempts::default();
        for round in 0..MAX_EVACUATION_ATTEMPTS {
            attempts.observe(&s);
            let (moves, stuck) = next_moves_except(&s, &attempts.given_up());
            assert!(stuck.is_empty(), "round {round}: {stuck:?}");
            assert_eq!(moves.len(), 1, "round {round}");
            let out =
                s.apply(&Command::StartMigration { name: "v".into(), to: moves[0].to, force: true, evacuation: true, across_sites: false }).expect("start");
            let Applied::MigrationStarted { to, .. } = out else { panic!("{out:?}") };
            attempts.started("v", to.generation);
            attempts.observe(&s);
            assert!(attempts.given_up().is_empty(), "an attempt under way is not a failure");
            s.apply(&Command::MigrationAbort { name: "v".into(), generation: to.generation, reason: "did not converge".into() }).expect("abort");
        }
        attempts.observe(&s);
        assert_eq!(attempts.given_up().get("v"), Some(&MAX_EVACUATION_ATTEMPTS));
        let (moves, stuck) = next_moves_except(&s, &attempts.given_up());
        assert!(moves.is_empty());
        assert_eq!(stuck.len(), 1);
        assert!(stuck[0].why.contains("did not complete 3 times"), "{:?}", stuck[0]);
        // Out of maintenance and in again: the count starts afresh.
        maintenance(&mut s, 0, HostMode::Normal);
        attempts.observe(&s);
        maintenance(&mut s, 0, HostMode::Maintenance);
        attempts.observe(&s);
        assert!(attempts.given_up().is_empty());
        assert_eq!(next_moves_except(&s, &attempts.given_up()).0.len(), 1);
    }

    /// A move back home that fails (it did not converge, its destination failed) leaves the VM
    /// away with its home remembered, so it is tried again — a bounded number of times, then
    /// reported; once back, the home is forgotten.
    #[test]
    fn a_vm_whose_move_back_home_fails_keeps_its_home_and_is_tried_again_within_a_bound() {
        let mut s = cluster(2, 8192);
        run_on(&mut s, process_vm("v", Protection::Protect, 0, 512), 0);
        maintenance(&mut s, 0, HostMode::Maintenance);
        run_to_completion(&mut s);
        assert_eq!(s.vms["v"].home, Some(HostId(0)));
        maintenance(&mut s, 0, HostMode::Normal);
        let mut attempts = EvacuationAttempts::default();
        for round in 0..MAX_EVACUATION_ATTEMPTS {
            attempts.observe(&s);
            let (moves, stuck) = next_moves_except(&s, &attempts.given_up());
            assert!(stuck.is_empty(), "round {round}: {stuck:?}");
            assert_eq!(moves.len(), 1, "round {round}: the move back is planned again");
            assert!(!moves[0].evacuation && moves[0].to == HostId(0));
            let out = s.apply(&moves[0].command(&s)).expect("start");
            let Applied::MigrationStarted { to, .. } = out else { panic!("{out:?}") };
            attempts.started("v", to.generation);
            assert_eq!(s.vms["v"].home, Some(HostId(0)), "round {round}: home kept while it moves");
            s.apply(&Command::MigrationAbort { name: "v".into(), generation: to.generation, reason: "did not converge".into() }).expect("abort");
            assert_eq!(s.vms["v"].home, Some(HostId(0)), "round {round}: a failed move back keeps the home");
        }
        attempts.observe(&s);
        let (moves, stuck) = next_moves_except(&s, &attempts.given_up());
        assert!(moves.is_empty(), "given up: {moves:?}");
        assert_eq!(stuck.len(), 1);
        assert!(stuck[0].why.contains("did not complete 3 times") && stuck[0].why.contains("home"), "{:?}", stuck[0]);
        // The host it stays on enters maintenance: leaving it is another move, counted afresh.
        maintenance(&mut s, 1, HostMode::Maintenance);
        attempts.observe(&s);
        assert!(attempts.given_up().is_empty(), "{:?}", attempts.given_up());
        maintenance(&mut s, 1, HostMode::Normal);
        attempts.observe(&s);
        // A new coordinator tries again, and the move that completes forgets the home.
        let (moves, _) = next_moves(&s);
        let out = s.apply(&moves[0].command(&s)).expect("start");
        let Applied::MigrationStarted { to, .. } = out else { panic!("{out:?}") };
        s.apply(&s.switchover_command("v", to.generation)).expect("switch");
        assert_eq!(s.vms["v"].assignment().map(|a| a.host), Some(HostId(0)));
        assert_eq!(s.vms["v"].home, None, "back home, the home is forgotten");
        attempts.observe(&s);
        assert!(attempts.given_up().is_empty());
    }

    #[test]
    fn a_vm_no_host_may_take_is_reported_and_the_plan_says_why() {
        let mut s = cluster(2, 1024);
        run_on(&mut s, process_vm("big", Protection::Protect, 0, 1024), 0);
        run_on(&mut s, process_vm("full", Protection::Protect, 0, 768), 1);
        let plan = evacuation_plan(&s, HostId(0));
        assert_eq!(plan.len(), 1);
        assert!(plan[0].1.is_err(), "{plan:?}");
        maintenance(&mut s, 0, HostMode::Maintenance);
        let (moves, stuck) = next_moves(&s);
        assert!(moves.is_empty());
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].vm, "big");
    }
}
