//! Planning for failed hosts: where the VMs of hosts that fail together restart, and which stay
//! down. The one routine behind the coordinator's failover (`recovery::plan_failover`), the
//! operator's `plan` and `whatif`, and the sites' loss reports that admission control judges.

use super::{ClusterState, PowerState};
use crate::hostset::{HostId, HostSet};
use crate::placement::{LeftDown, PlacementResult};

impl ClusterState {
    /// The plan for the running-desired VMs of the `failed` hosts, onto `eligible` hosts (failed
    /// hosts are never eligible). Capacity taken by the failed hosts' own VMs is not counted.
    #[must_use]
    pub fn plan_failure(&self, failed: &[HostId], eligible: HostSet) -> PlacementResult {
        let mut model = self.placement_model(eligible);
        // A VM whose disk is on a failed host's own storage is not restarted anywhere: it waits
        // for its host (and takes no room in the plan).
        let bound: Vec<String> = self
            .vms
            .values()
            .filter(|v| v.spec.bound_to_host() && v.desired() == PowerState::Running && v.assignment().is_some_and(|a| failed.contains(&a.host)))
            .map(|v| v.spec.name.clone())
            .collect();
        for vm in model.vms.iter_mut().filter(|v| bound.contains(&v.name)) {
            vm.running = false;
        }
        let failed: Vec<u32> = failed.iter().filter_map(|h| model.host_index(*h)).collect();
        let mut plan = model.named(&model.plan(&failed, false));
        plan.left_down.retain(|(n, _)| !bound.contains(n));
        plan.left_down.extend(bound.into_iter().map(|n| (n, LeftDown::LocalDisk)));
        // A site-mirrored VM that found no host is down for want of a current copy when no
        // eligible host stands at a site with one.
        for (name, why) in &mut plan.left_down {
            let Some(vm) = self.vms.get(name.as_str()).filter(|v| v.spec.site_mirrored()) else { continue };
            if !eligible.iter().any(|h| self.copy_current_on(vm, h)) {
                *why = LeftDown::NoCurrentCopy;
            }
        }
        plan
    }

    /// "What if these hosts failed together": [`ClusterState::plan_failure`] while the
    /// survivors hold a majority of the voting hosts; otherwise nothing can be committed, so
    /// every VM that ran on the failed hosts stays down (`NoQuorum`). The flag says which case
    /// it is.
    #[must_use]
    pub fn plan_what_if(&self, failed: &[HostId]) -> (PlacementResult, bool) {
        let members = self.members();
        let lost = failed.iter().filter(|h| members.contains(**h)).count();
        let quorum = self.quorum_after_losing(lost);
        if quorum {
            return (self.plan_failure(failed, members), true);
        }
        let left_down = self
            .vms
            .values()
            .filter(|v| v.desired() == PowerState::Running && v.assignment().is_some_and(|a| failed.contains(&a.host)))
            .map(|v| (v.spec.name.clone(), LeftDown::NoQuorum))
            .collect();
        (PlacementResult { placements: vec![], left_down }, false)
    }
}

#[cfg(test)]
mod tests {
    use crate::hostset::HostId;
    use crate::placement::{FttLimit, LeftDown};
    use crate::state::tests::{cluster, process_vm, run_on};
    use crate::state::{Command, Protection};

    /// Two hosts alone tolerate no failure (no majority is left); with the disk witness's vote
    /// they tolerate one where room allows, and "what if h0 fails" restarts its VM on h1.
    #[test]
    fn a_two_host_cluster_tolerates_one_failure_only_with_the_disk_witness() {
        let mut s = cluster(2, 4096);
        run_on(&mut s, process_vm("p", Protection::Protect, 0, 1024), 0);
        let report = s.ftt();
        assert_eq!((report.ftt, report.limited_by), (0, FttLimit::Quorum));
        let (plan, quorum) = s.plan_what_if(&[HostId(0)]);
        assert!(!quorum);
        assert_eq!(plan.left_down, vec![("p".to_string(), LeftDown::NoQuorum)]);
        s.apply(&Command::SetWitness { disk: true }).expect("applies");
        assert_eq!(s.voters(), 3);
        assert_eq!(s.ftt().ftt, 1, "{:?}", s.ftt());
        let (plan, quorum) = s.plan_what_if(&[HostId(0)]);
        assert!(quorum);
        assert_eq!(plan.placements.len(), 1, "{plan:?}");
        assert!(!s.quorum_after_losing(2), "the witness is one vote: both hosts lost is no majority");
        // Room decides the rest: a VM too large for the survivor keeps FTT at 0.
        run_on(&mut s, process_vm("big", Protection::Protect, 0, 3584), 1);
        assert_eq!(s.ftt().ftt, 0);
    }
}
