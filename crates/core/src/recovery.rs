//! Recovery plans: where the VMs of a failed host, or VMs waiting to start, should run.
//!
//! The same function places VMs at start and after a failure, so what an operator is shown is
//! what the coordinator does. Order: protected VMs first, then best-effort; higher priority
//! first; larger memory first (big VMs are hardest to fit); then by name. Each VM goes to the
//! eligible host with the most free memory that fits its vCPUs and memory.

use crate::hostset::{HostId, HostSet};
use crate::state::{Capacity, ClusterState, PowerState, Protection};
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
}

/// A computed plan.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryPlan {
    pub placements: Vec<(String, HostId)>,
    pub left_down: Vec<(String, LeftDown)>,
}

fn order_key(state: &ClusterState, name: &str) -> (u8, i64, u64, String) {
    let spec = &state.vms[name].spec;
    let level = match spec.protection {
        Protection::Protect => 0,
        Protection::BestEffort => 1,
        Protection::Off => 2,
    };
    (level, -i64::from(spec.priority), u64::MAX - spec.memory_mib, name.to_string())
}

/// Places `names` on the `eligible` hosts, counting what is already assigned there.
/// `allow_off` says whether `off` VMs may be placed (an operator start) or not (a failover).
#[must_use]
pub fn place(state: &ClusterState, names: &[String], eligible: HostSet, allow_off: bool) -> RecoveryPlan {
    let mut free: BTreeMap<HostId, Capacity> = BTreeMap::new();
    for h in eligible.iter() {
        if let Some(rec) = state.hosts.get(&h) {
            let used = state.used(h);
            free.insert(
                h,
                Capacity {
                    vcpus: rec.capacity.vcpus.saturating_sub(used.vcpus),
                    memory_mib: rec.capacity.memory_mib.saturating_sub(used.memory_mib),
                },
            );
        }
    }
    let mut order: Vec<&String> = names.iter().filter(|n| state.vms.contains_key(n.as_str())).collect();
    order.sort_by_cached_key(|n| order_key(state, n));
    let mut plan = RecoveryPlan::default();
    for name in order {
        let spec = &state.vms[name.as_str()].spec;
        if spec.protection == Protection::Off && !allow_off {
            plan.left_down.push((name.clone(), LeftDown::ProtectionOff));
            continue;
        }
        let best = free
            .iter()
            .filter(|(_, f)| f.vcpus >= spec.vcpus && f.memory_mib >= spec.memory_mib)
            .max_by(|(ha, fa), (hb, fb)| fa.memory_mib.cmp(&fb.memory_mib).then(hb.cmp(ha)))
            .map(|(h, _)| *h);
        match best {
            Some(h) => {
                if let Some(f) = free.get_mut(&h) {
                    f.vcpus -= spec.vcpus;
                    f.memory_mib -= spec.memory_mib;
                }
                plan.placements.push((name.clone(), h));
            }
            None => plan.left_down.push((name.clone(), LeftDown::NoCapacity)),
        }
    }
    plan
}

/// The plan for the running-desired VMs of `failed`, onto `eligible` hosts (the failed host is
/// never eligible). Capacity taken by the failed host's own VMs is not counted anywhere.
#[must_use]
pub fn plan_failover(state: &ClusterState, failed: HostId, eligible: HostSet) -> RecoveryPlan {
    let mut eligible = eligible;
    eligible.remove(failed);
    let victims: Vec<String> = state
        .assigned_to(failed)
        .filter(|v| v.desired == PowerState::Running)
        .map(|v| v.spec.name.clone())
        .collect();
    place(state, &victims, eligible, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cluster, process_vm, run_on};
    use crate::state::{Applied, Command};
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
                s.apply(&Command::SetPower { name: name.clone(), desired: PowerState::Running }).expect("start");
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
