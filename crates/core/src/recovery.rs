//! Recovery plans: where the VMs of a failed host, or VMs waiting to start, should run.
//!
//! Names-and-hosts wrappers around [`crate::placement`]: the same routine places VMs at start,
//! after a failure, and in `tandem plan` / `tandem whatif`, so what an operator is shown is what
//! the coordinator does.

use crate::hostset::{HostId, HostSet};
use crate::state::{ClusterState, PowerState};
use crate::time::Millis;
use serde::Serialize;

pub use crate::placement::{LeftDown, PlacementResult};

/// Places `names` (VMs without a host) on the `eligible` hosts, counting what is already
/// assigned there. `allow_off` says whether `off` VMs may be placed (an operator start) or not.
#[must_use]
pub fn place(state: &ClusterState, names: &[String], eligible: HostSet, allow_off: bool) -> PlacementResult {
    state.place(names, eligible, allow_off)
}

/// The plan for the running-desired VMs of the `failed` hosts, onto `eligible` hosts (failed
/// hosts are never eligible). Capacity taken by the failed hosts' own VMs is not counted. (The
/// routine is [`ClusterState::plan_failure`], in the state layer, so that admission control's
/// site target plans with it too.)
#[must_use]
pub fn plan_failure(state: &ClusterState, failed: &[HostId], eligible: HostSet) -> PlacementResult {
    state.plan_failure(failed, eligible)
}

/// What an operator's "what if these hosts failed together" gets: [`plan_failure`] while the
/// survivors hold a majority of the voting hosts; otherwise nothing can be committed, so every
/// VM that ran on the failed hosts stays down (`NoQuorum`). The flag says which case it is.
#[must_use]
pub fn plan_what_if(state: &ClusterState, failed: &[HostId]) -> (PlacementResult, bool) {
    state.plan_what_if(failed)
}

/// Why a running-desired VM that has no host cannot be placed on the `eligible` hosts now, in
/// words for an operator ("no host has 999999 MiB free; the most free is 4096 MiB on h1"), or
/// `None` if it can be placed.
#[must_use]
pub fn waiting_reason(state: &ClusterState, name: &str, eligible: HostSet) -> Option<String> {
    let plan = place(state, &[name.to_string()], eligible, true);
    let why = plan.left_down.iter().find(|(n, _)| n == name).map(|(_, w)| *w)?;
    let vm = state.vms.get(name)?;
    if let Some(disk_host) = vm.start_host() {
        let host = state.hosts.get(&disk_host).map_or_else(|| disk_host.to_string(), |h| h.name.clone());
        return Some(format!(
            "its local disk's latest copy is on {host}, which cannot take it now (down, in maintenance, full or the VM failed there); it starts nowhere else"
        ));
    }
    let usable: Vec<&crate::state::HostRecord> = state
        .hosts
        .values()
        .filter(|h| h.status == crate::state::HostStatus::Active && h.mode == crate::state::HostMode::Normal && eligible.contains(h.id))
        .collect();
    if usable.is_empty() {
        return Some("no host is active, seen alive and in normal mode".into());
    }
    let free = |h: &crate::state::HostRecord| {
        let used = state.used(h.id);
        let cpus = u64::from(h.capacity.vcpus) * u64::from(state.settings.vcpu_overcommit_pct) / 100;
        (h.capacity.memory_mib.saturating_sub(used.memory_mib), cpus.saturating_sub(u64::from(used.vcpus)))
    };
    // The most free, the lowest host id among equals.
    let most_mem = usable.iter().max_by(|a, b| free(a).0.cmp(&free(b).0).then(b.id.cmp(&a.id))).map(|h| (free(h).0, h.name.clone()));
    let most_cpu = usable.iter().max_by(|a, b| free(a).1.cmp(&free(b).1).then(b.id.cmp(&a.id))).map(|h| (free(h).1, h.name.clone()));
    Some(match (why, most_mem, most_cpu) {
        (LeftDown::NoCapacity, Some((mem, host)), _) if mem < vm.spec.memory_mib => {
            format!("no host has {} MiB free; the most free is {mem} MiB on {host}", vm.spec.memory_mib)
        }
        (LeftDown::NoCapacity, _, Some((cpu, host))) if cpu < u64::from(vm.spec.vcpus) => {
            format!("no host has {} vCPUs free; the most free is {cpu} on {host}", vm.spec.vcpus)
        }
        (LeftDown::NoCapacity, _, _) => "no host has both the memory and the vCPUs free (or it failed on those that do)".into(),
        (LeftDown::HardRule, _, _) => "every host with room would break a hard placement rule".into(),
        (LeftDown::ProtectionOff, _, _) => "protection is off".into(),
        (LeftDown::NoQuorum, _, _) => "no quorum".into(),
        (LeftDown::LocalDisk, _, _) => "its disk is on its host's own storage".into(),
        (LeftDown::NoCurrentCopy, _, _) => format!("no surviving site holds a current copy of its mirrored disks (current: {})", vm.copies.join(", ")),
    })
}

/// [`plan_failure`] for one host: what the coordinator proposes when `failed` is declared dead.
#[must_use]
pub fn plan_failover(state: &ClusterState, failed: HostId, eligible: HostSet) -> PlacementResult {
    plan_failure(state, &[failed], eligible)
}

/// The coordinator's memory of the restart group it is holding back: which group, and since
/// when (its own clock). Not replicated: a new coordinator starts the wait again, so a group
/// waits at most its delay per coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupGate {
    pub group: u8,
    pub since: Millis,
}

/// Why a held restart group is let go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupReleaseReason {
    /// Every placed VM of the lower groups runs.
    LowerGroupsRunning,
    /// The group's delay passed first.
    DelayPassed,
}

/// A held restart group to let go now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRelease {
    pub group: u8,
    pub names: Vec<String>,
    pub reason: GroupReleaseReason,
}

/// The lowest restart group that is held, and what it waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldGroup {
    pub group: u8,
    /// The placed VMs of lower groups, as (name, host, generation).
    pub waits_for: Vec<(String, HostId, u64)>,
}

/// The lowest held restart group; `None` when nothing is held.
#[must_use]
pub fn lowest_held_group(state: &ClusterState) -> Option<HeldGroup> {
    let placed = || state.vms.values().filter(|v| v.desired() == PowerState::Running && v.assignment().is_some());
    let group = placed().filter(|v| v.held()).map(|v| v.spec.restart_group).min()?;
    let lower = placed()
        .filter(|v| !v.held() && v.spec.restart_group < group)
        .filter_map(|v| v.assignment().map(|a| (v.spec.name.clone(), a.host, a.generation)))
        .collect();
    Some(HeldGroup { group, waits_for: lower })
}

/// Decides whether the lowest held restart group may start. `runs(name, generation)` says
/// whether a VM runs at that generation on its host, as far as the coordinator could learn
/// (a host it could not ask counts as running nothing). `gate` is updated.
pub fn release_held(state: &ClusterState, runs: impl Fn(&str, u64) -> bool, gate: &mut Option<GroupGate>, now: Millis) -> Option<GroupRelease> {
    let Some(HeldGroup { group, waits_for: lower }) = lowest_held_group(state) else {
        *gate = None;
        return None;
    };
    let since = match *gate {
        Some(g) if g.group == group => g.since,
        _ => {
            *gate = Some(GroupGate { group, since: now });
            now
        }
    };
    let lower_run = lower.iter().all(|(name, _, generation)| runs(name, *generation));
    let reason = if lower_run {
        GroupReleaseReason::LowerGroupsRunning
    } else if now.0.saturating_sub(since.0) >= state.settings.group_delay_ms(group) {
        GroupReleaseReason::DelayPassed
    } else {
        return None;
    };
    let names = state
        .vms
        .values()
        .filter(|v| v.held() && v.desired() == PowerState::Running && v.assignment().is_some() && v.spec.restart_group == group)
        .map(|v| v.spec.name.clone())
        .collect();
    *gate = None;
    Some(GroupRelease { group, names, reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cluster, process_vm, run_on};
    use crate::state::{Applied, Command, PowerState, Protection};
    use proptest::prelude::*;

    #[test]
    fn protected_and_high_priority_first_within_capacity() {
        let mut s = cluster(2, 1000);
        run_on(&mut s, process_vm("low", Protection::Protect, 1, 400), 0);
        run_on(&mut s, process_vm("high", Protection::Protect, 9, 400), 0);
        run_on(&mut s, process_vm("be", Protection::BestEffort, 100, 100), 0);
        run_on(&mut s, process_vm("off", Protection::Off, 100, 50), 0);
        run_on(&mut s, process_vm("resident", Protection::Protect, 0, 500), 1);
        // Host 1 has 500 MiB free: only one of the 400 MiB protected VMs fits, and it is "high";
        // "be" fits in the remaining 100 MiB.
        let plan = plan_failover(&s, HostId(0), s.active_hosts());
        assert_eq!(plan.placements, vec![("high".to_string(), HostId(1)), ("be".to_string(), HostId(1))]);
        assert_eq!(plan.left_down, vec![("low".to_string(), LeftDown::NoCapacity), ("off".to_string(), LeftDown::ProtectionOff)]);
    }

    fn fail_host_0(s: &mut ClusterState) -> Applied {
        let epoch = s.hosts[&HostId(0)].epoch;
        let plan = plan_failover(s, HostId(0), HostSet(0b110)).placements;
        s.apply(&Command::Failover { host: HostId(0), epoch, plan }).expect("failover")
    }

    /// Restart order: after a failover only the lowest group starts; the next one goes when
    /// the lower groups run, the one after that when its delay passes first.
    #[test]
    fn restart_groups_start_in_order_or_after_their_delay() {
        let mut s = cluster(3, 4096);
        for (name, group) in [("db", 0), ("app", 1), ("web", 2), ("web2", 2)] {
            let mut spec = process_vm(name, Protection::Protect, 0, 256);
            spec.restart_group = group;
            run_on(&mut s, spec, 0);
        }
        let mut settings = s.settings.clone();
        settings.group_delays_ms.insert(2, 5_000);
        s.apply(&Command::SetSettings { settings, force: false }).expect("settings");
        fail_host_0(&mut s);
        let held: Vec<&str> = s.vms.values().filter(|v| v.held()).map(|v| v.spec.name.as_str()).collect();
        assert_eq!(held, ["app", "web", "web2"]);
        let mut gate = None;
        let mut running: Vec<&str> = vec![];
        let gen_of = |s: &ClusterState, n: &str| s.vms[n].assignment().map(|a| a.generation);
        // Nothing runs yet: group 1 waits (its delay is the default 120 s).
        assert_eq!(release_held(&s, |_, _| false, &mut gate, Millis(1_000)), None);
        assert_eq!(release_held(&s, |_, _| false, &mut gate, Millis(60_000)), None);
        // "db" runs at its new generation (an old generation would not count).
        let db_gen = gen_of(&s, "db").expect("db placed");
        assert_eq!(release_held(&s, |n, g| n == "db" && g + 1 == db_gen, &mut gate, Millis(61_000)), None);
        running.push("db");
        fn runs<'a>(running: &'a [&'a str]) -> impl Fn(&str, u64) -> bool + 'a {
            move |n, _| running.contains(&n)
        }
        let r = release_held(&s, runs(&running), &mut gate, Millis(62_000)).expect("group 1 goes");
        assert_eq!((r.group, r.names.clone(), r.reason), (1, vec!["app".to_string()], GroupReleaseReason::LowerGroupsRunning));
        s.apply(&Command::ReleaseHeld { names: r.names }).expect("release");
        // "app" does not come up: group 2 goes after its own 5 s delay.
        assert_eq!(release_held(&s, runs(&running), &mut gate, Millis(63_000)), None);
        assert_eq!(release_held(&s, runs(&running), &mut gate, Millis(67_999)), None);
        let r = release_held(&s, runs(&running), &mut gate, Millis(68_000)).expect("group 2 goes");
        assert_eq!((r.names.len(), r.reason), (2, GroupReleaseReason::DelayPassed));
        s.apply(&Command::ReleaseHeld { names: r.names }).expect("release");
        assert_eq!(release_held(&s, |_, _| true, &mut gate, Millis(70_000)), None);
        assert!(gate.is_none());
    }

    /// A `best-effort` VM a failover could not place waits for a bounded number of retries,
    /// then stops; an `off` VM stops at once; a `protect` VM waits as long as it takes.
    #[test]
    fn best_effort_waits_for_capacity_a_bounded_number_of_retries() {
        let mut s = cluster(3, 2000);
        run_on(&mut s, process_vm("be", Protection::BestEffort, 0, 900), 0);
        run_on(&mut s, process_vm("pr", Protection::Protect, 0, 900), 0);
        run_on(&mut s, process_vm("off", Protection::Off, 0, 50), 0);
        run_on(&mut s, process_vm("fill1", Protection::Protect, 0, 1800), 1);
        run_on(&mut s, process_vm("fill2", Protection::Protect, 0, 1800), 2);
        let Applied::FailedOver { left_down, .. } = fail_host_0(&mut s) else { panic!("not a failover") };
        assert_eq!(left_down.len(), 3);
        assert_eq!(s.vms["off"].desired(), PowerState::Stopped);
        assert_eq!((s.vms["be"].desired(), s.vms["be"].capacity_retries()), (PowerState::Running, Some(0)));
        let retry = Command::CapacityRetry { name: "be".into() };
        for attempt in 1..crate::state::BEST_EFFORT_RETRIES {
            assert_eq!(s.apply(&retry), Ok(Applied::StillWaiting { name: "be".into(), attempt }));
        }
        assert_eq!(s.apply(&retry), Ok(Applied::GaveUpWaiting { name: "be".into() }));
        assert_eq!(s.vms["be"].desired(), PowerState::Stopped);
        assert!(s.apply(&retry).is_err(), "no longer waiting");
        assert!(s.apply(&Command::CapacityRetry { name: "pr".into() }).is_err(), "protect VMs never give up");
        assert_eq!(s.vms["pr"].desired(), PowerState::Running);
    }

    #[test]
    fn worst_fit_spreads_over_hosts_and_never_uses_the_failed_one() {
        let mut s = cluster(4, 4096);
        for i in 0..6 {
            run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 512), 0);
        }
        let plan = plan_failover(&s, HostId(0), HostSet(0b1111));
        assert_eq!(plan.placements.len(), 6);
        for h in 1..4 {
            assert_eq!(plan.placements.iter().filter(|(_, t)| *t == HostId(h)).count(), 2);
        }
    }

    proptest! {
        /// A plan never overfills a host, never targets the failed host, and once applied
        /// through the state machine places exactly what it planned.
        #[test]
        fn plans_respect_capacity(hosts in 2u32..6, mems in proptest::collection::vec((64u64..2048, 0usize..6, 0i32..3, 0u8..3), 1..30)) {
            let mut s = cluster(hosts, 4096);
            for (i, (mem, host, prio, prot)) in mems.iter().enumerate() {
                let prot = [Protection::Protect, Protection::BestEffort, Protection::Off][*prot as usize];
                let name = format!("v{i}");
                s.apply(&Command::CreateVm { spec: process_vm(&name, prot, *prio, *mem) }).expect("create");
                s.apply(&Command::SetPower { name: name.clone(), desired: PowerState::Running, force: false }).expect("start");
                let _ = s.apply(&Command::Assign { name, host: HostId((*host as u32) % hosts) });
            }
            let plan = plan_failover(&s, HostId(0), s.active_hosts());
            prop_assert!(plan.placements.iter().all(|(_, h)| *h != HostId(0)));
            let epoch = s.hosts[&HostId(0)].epoch;
            let out = s.apply(&Command::Failover { host: HostId(0), epoch, plan: plan.placements.clone() }).expect("failover");
            let Applied::FailedOver { moved, .. } = out else { panic!("unexpected") };
            prop_assert_eq!(moved.len(), plan.placements.len(), "state machine refused part of a plan");
            for (h, rec) in &s.hosts {
                let used = s.used(*h);
                prop_assert!(used.memory_mib <= rec.capacity.memory_mib && used.vcpus <= rec.capacity.vcpus);
            }
            // No protected VM is left down while some host could still take it.
            for (name, why) in &plan.left_down {
                if *why == LeftDown::NoCapacity && s.vms[name].spec.protection == Protection::Protect {
                    let d = s.vms[name].spec.demand();
                    prop_assert!(!s.active_hosts().iter().any(|h| h != HostId(0) && s.fits(h, d)));
                }
            }
        }
    }

    /// A protected VM that no host can hold says why, and FTT counts it: no plan exists, so the
    /// cluster survives no failure (it used to report FTT 1 and say nothing).
    #[test]
    fn an_unplaceable_protected_vm_says_why_and_makes_ftt_zero() {
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 1024), 1);
        assert_eq!(s.ftt().ftt, 1);
        s.apply(&Command::CreateVm { spec: process_vm("huge", Protection::Protect, 0, 999_999) }).expect("create");
        s.apply(&Command::SetPower { name: "huge".into(), desired: crate::state::PowerState::Running, force: true }).expect("start");
        let why = waiting_reason(&s, "huge", s.active_hosts()).expect("it cannot be placed");
        assert_eq!(why, "no host has 999999 MiB free; the most free is 4096 MiB on h0");
        let r = s.ftt();
        assert_eq!((r.ftt, r.limited_by), (0, crate::placement::FttLimit::Unplaceable));
        assert_eq!(r.counterexample, Some((vec![], vec!["huge".to_string()])));
        assert_eq!(waiting_reason(&s, "a", s.active_hosts()), None, "a placed VM does not wait");
    }
}
