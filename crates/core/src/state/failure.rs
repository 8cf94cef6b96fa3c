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
        let quorum = members.len() - lost > members.len() / 2;
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
