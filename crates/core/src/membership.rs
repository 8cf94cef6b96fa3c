//! The membership decision, sans I/O: whether this host must give up the epoch it joined in
//! (committed state failed it over, or it rejoined elsewhere), may join again, or waits.

use crate::liveness::{Assessment, FenceReason};
use crate::state::HostStatus;

/// What one pass of the membership loop sees.
#[derive(Clone, Copy, Debug)]
pub struct MembershipView<'a> {
    /// The epoch this host joined in, if it is joined.
    pub joined: Option<u64>,
    /// This host's status and epoch in committed state, if it is a member.
    pub committed: Option<(HostStatus, u64)>,
    /// The leader this host's Raft node names (a node id), if any.
    pub leader: Option<u64>,
    /// The agent is stopping (SIGTERM) or its consensus stopped for good.
    pub stopping: bool,
    pub fenced: Option<FenceReason>,
    pub assessment: Option<&'a Assessment>,
}

/// What the membership loop does now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipStep {
    Wait,
    /// Committed state no longer has this host active in the epoch it joined in: unjoin (so no
    /// start passes its check), kill every VM, and join again later.
    EpochLost {
        status: HostStatus,
        epoch: u64,
        joined: u64,
    },
    /// Propose `HostJoined`.
    Join,
}

/// The decision.
#[must_use]
pub fn decide(v: &MembershipView<'_>) -> MembershipStep {
    if let (Some(joined), Some((status, epoch))) = (v.joined, v.committed) {
        if status != HostStatus::Active || epoch != joined {
            return MembershipStep::EpochLost { status, epoch, joined };
        }
        return MembershipStep::Wait;
    }
    // The disk witness's node leads only to hand over to a host that caught up: a join
    // forwarded to it fails, counts as undecided and raises the epoch this host promises never
    // to run VMs in — a dozen joins committed and given up in a row once a host led (simulator,
    // two hosts, `partition-uneven-heal` seed 33). Wait for a host to lead.
    let leader_known = v.leader.is_some_and(|l| l != crate::witness::WITNESS_NODE);
    if v.joined.is_some() || v.committed.is_none() || !leader_known {
        return MembershipStep::Wait;
    }
    // A host that is stopping, or whose consensus stopped, never joins again.
    if v.stopping || matches!(v.fenced, Some(FenceReason::Stopping | FenceReason::ConsensusStopped)) {
        return MembershipStep::Wait;
    }
    // Only a host that a majority hears and that has no reason to fence joins.
    match v.assessment {
        Some(a) if a.fence.is_none() && a.has_majority => MembershipStep::Join,
        _ => MembershipStep::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostset::HostSet;
    use crate::time::Millis;

    fn healthy() -> Assessment {
        Assessment { now: Millis(0), heard: HostSet::EMPTY, disk_alive: HostSet::EMPTY, disk_readable: true, peers: vec![], fence: None, has_majority: true }
    }

    #[test]
    fn a_joined_host_gives_up_an_epoch_committed_state_moved_past() {
        let a = healthy();
        let v =
            MembershipView { joined: Some(3), committed: Some((HostStatus::Active, 3)), leader: Some(0), stopping: false, fenced: None, assessment: Some(&a) };
        assert_eq!(decide(&v), MembershipStep::Wait);
        let failed = MembershipView { committed: Some((HostStatus::Failed, 3)), ..v };
        assert_eq!(decide(&failed), MembershipStep::EpochLost { status: HostStatus::Failed, epoch: 3, joined: 3 });
        let newer = MembershipView { committed: Some((HostStatus::Active, 4)), ..v };
        assert!(matches!(decide(&newer), MembershipStep::EpochLost { epoch: 4, joined: 3, .. }));
    }

    #[test]
    fn an_unjoined_host_joins_only_when_heard_by_a_majority_with_no_reason_to_fence() {
        let a = healthy();
        let v = MembershipView {
            joined: None,
            committed: Some((HostStatus::Failed, 3)),
            leader: Some(0),
            stopping: false,
            fenced: Some(FenceReason::Isolated { silent_ms: 2500 }),
            assessment: Some(&a),
        };
        assert_eq!(decide(&v), MembershipStep::Join, "a fence for isolation ends with a rejoin");
        assert_eq!(decide(&MembershipView { leader: None, ..v }), MembershipStep::Wait);
        assert_eq!(decide(&MembershipView { leader: Some(crate::witness::WITNESS_NODE), ..v }), MembershipStep::Wait, "the witness leads only to hand over");
        assert_eq!(decide(&MembershipView { committed: None, ..v }), MembershipStep::Wait, "not a member yet");
        assert_eq!(decide(&MembershipView { stopping: true, ..v }), MembershipStep::Wait);
        assert_eq!(decide(&MembershipView { fenced: Some(FenceReason::ConsensusStopped), ..v }), MembershipStep::Wait);
        let minority = Assessment { has_majority: false, ..healthy() };
        assert_eq!(decide(&MembershipView { assessment: Some(&minority), ..v }), MembershipStep::Wait);
        assert_eq!(decide(&MembershipView { assessment: None, ..v }), MembershipStep::Wait);
    }
}
