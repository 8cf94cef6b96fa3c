//! Recovery plans: where the VMs of a failed host, or VMs waiting to start, should run.
//!
//! Names-and-hosts wrappers around [`crate::placement`]: the same routine places VMs at start,
//! after a failure, and in `tandem plan` / `tandem whatif`, so what an operator is shown is what
//! the coordinator does.

use crate::hostset::{HostId, HostSet};
use crate::placement::{Model, NotPlaced, Plan};
use crate::state::ClusterState;
use serde::Serialize;
use std::collections::BTreeMap;

/// Why a VM is not placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeftDown {
    /// Protection `off`: HA never restarts it.
    ProtectionOff,
    /// No eligible host has room for it.
    NoCapacity,
    /// Hosts with room exist, but each would break a hard placement rule.
    HardRule,
}

/// A computed plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryPlan {
    pub placements: Vec<(String, HostId)>,
    pub left_down: Vec<(String, LeftDown)>,
}

fn named(model: &Model, plan: &Plan) -> RecoveryPlan {
    RecoveryPlan {
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

/// Places `names` (VMs without a host) on the `eligible` hosts, counting what is already
/// assigned there. `allow_off` says whether `off` VMs may be placed (an operator start) or not.
#[must_use]
pub fn place(state: &ClusterState, names: &[String], eligible: HostSet, allow_off: bool) -> RecoveryPlan {
    let model = state.placement_model(eligible);
    let index: BTreeMap<&str, u32> = model.vms.iter().enumerate().map(|(i, v)| (v.name.as_str(), i as u32)).collect();
    let to_place: Vec<u32> = names.iter().filter_map(|n| index.get(n.as_str()).copied()).collect();
    named(&model, &model.place(&[], to_place, allow_off, false))
}

/// The plan for the running-desired VMs of the `failed` hosts, onto `eligible` hosts (failed
/// hosts are never eligible). Capacity taken by the failed hosts' own VMs is not counted.
#[must_use]
pub fn plan_failure(state: &ClusterState, failed: &[HostId], eligible: HostSet) -> RecoveryPlan {
    let model = state.placement_model(eligible);
    let failed: Vec<u32> = failed.iter().filter_map(|h| model.host_index(*h)).collect();
    named(&model, &model.plan(&failed, false))
}

/// [`plan_failure`] for one host: what the coordinator proposes when `failed` is declared dead.
#[must_use]
pub fn plan_failover(state: &ClusterState, failed: HostId, eligible: HostSet) -> RecoveryPlan {
    plan_failure(state, &[failed], eligible)
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
        assert_eq!(
            plan.left_down,
            vec![("low".to_string(), LeftDown::NoCapacity), ("off".to_string(), LeftDown::ProtectionOff)]
        );
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
}
