//! The coordinator's failover decision, sans I/O: which active hosts may be failed over now, and
//! why. A host's VMs may move only once they certainly stopped: the host reported itself fenced
//! through its current epoch (or a later one) and `kill_grace_ms` passed since that report was
//! first seen (a qemu in
//! uninterruptible I/O may still have writes in flight), or it is dead and its fence deadline
//! passed. The coordinator's own fence counts once its exits are confirmed and the grace passed,
//! for an epoch it has promised never to run VMs in again.

use crate::hostset::HostId;
use crate::liveness::{Assessment, FenceReason, HostLiveness};
use crate::state::{ClusterState, HostStatus};
use crate::time::Millis;
use std::collections::{BTreeMap, BTreeSet};

/// Why a host may be failed over now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailoverReason {
    /// The coordinator itself fenced (its exits confirmed `kill_grace_ms` ago).
    OwnFence(FenceReason),
    /// The host reported itself fenced through its current epoch, `kill_grace_ms` ago or more.
    ReportedFenced,
    /// Dead, and its fence deadline passed `past_deadline_ms` ago.
    Dead { net_age_ms: u64, disk_age_ms: u64, past_deadline_ms: u64 },
    /// Only under the simulator's mutation check: not heard, fence deadline skipped.
    UnsafeSkippedFenceWait,
}

/// One host the coordinator fails over, at the epoch it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailoverCandidate {
    pub host: HostId,
    pub epoch: u64,
    pub reason: FailoverReason,
}

/// The coordinator's own fence, as its runtime status says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnFence {
    pub reason: FenceReason,
    /// When every VM exit was confirmed, if yet.
    pub confirmed_at: Option<Millis>,
    /// The epochs this host has promised never to run VMs in again (see `RuntimeStatus` in the
    /// agent): its own VMs move only while committed state has it in one of them.
    pub promised_through: u64,
}

/// What the coordinator remembers between passes: when it first saw each host report itself
/// fenced in an epoch (the grace is counted on its own clock from then).
#[derive(Clone, Debug, Default)]
pub struct FenceReports {
    first_seen: BTreeMap<(HostId, u64), Millis>,
}

/// The inputs of one decision.
#[derive(Clone, Copy, Debug)]
pub struct FailoverInputs<'a> {
    pub me: HostId,
    pub state: &'a ClusterState,
    pub assessment: &'a Assessment,
    pub own_fence: Option<OwnFence>,
    pub kill_grace_ms: u64,
    pub now: Millis,
    /// The simulator's mutation check; production never sets it.
    pub skip_fence_wait: bool,
    /// The simulator's mutation check: deadlines counted from evidence this much too early;
    /// production always passes 0.
    pub deadline_early_ms: u64,
}

impl FenceReports {
    /// The active hosts that may be failed over now, with why, in host order.
    pub fn failover_candidates(&mut self, i: &FailoverInputs<'_>) -> Vec<FailoverCandidate> {
        let reported: BTreeMap<HostId, u64> = i.assessment.peers.iter().filter_map(|p| Some((p.host, p.fenced_epoch?))).collect();
        self.first_seen.retain(|(h, e), _| reported.get(h) == Some(e));
        let due: BTreeSet<HostId> =
            reported.iter().filter(|(h, e)| i.now.since(*self.first_seen.entry((**h, **e)).or_insert(i.now)) >= i.kill_grace_ms).map(|(h, _)| *h).collect();
        let own = i.own_fence.filter(|f| f.confirmed_at.is_some_and(|c| i.now.since(c) >= i.kill_grace_ms));
        i.state
            .hosts
            .values()
            .filter(|h| h.status == HostStatus::Active)
            .filter_map(|h| {
                let reason = if h.id == i.me {
                    // Fencing killed our VMs before the flag was set, and nothing starts here
                    // while it is set: our VMs may move once the exits are confirmed.
                    let own = own.filter(|f| h.epoch <= f.promised_through)?;
                    FailoverReason::OwnFence(own.reason)
                } else {
                    let p = i.assessment.peer(h.id)?;
                    // A fence is reported "through" an epoch: the reporter runs no VM in that
                    // epoch or any before it, ever again (it joins again in a later one). A
                    // host of an older release reports the epoch it fenced in, which is never
                    // past the committed one, so for it this is the old equality.
                    if p.fenced_epoch.is_some_and(|through| through >= h.epoch) && due.contains(&h.id) {
                        FailoverReason::ReportedFenced
                    } else if i.skip_fence_wait && p.liveness != HostLiveness::Alive && p.liveness != HostLiveness::Unknown {
                        FailoverReason::UnsafeSkippedFenceWait
                    } else {
                        let deadline = p.fence_deadline?;
                        if p.liveness != HostLiveness::Dead || i.now.plus(i.deadline_early_ms) < deadline {
                            return None;
                        }
                        FailoverReason::Dead {
                            net_age_ms: p.net_age_ms.unwrap_or(0),
                            disk_age_ms: p.disk_age_ms.unwrap_or(0),
                            past_deadline_ms: i.now.since(deadline),
                        }
                    }
                };
                Some(FailoverCandidate { host: h.id, epoch: h.epoch, reason })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostset::HostSet;
    use crate::liveness::PeerAssessment;
    use crate::state::tests::cluster;

    fn peer(host: u32, liveness: HostLiveness) -> PeerAssessment {
        PeerAssessment {
            host: HostId(host),
            liveness,
            net_age_ms: Some(4000),
            disk_age_ms: Some(4000),
            fenced_epoch: None,
            dead_since: None,
            last_evidence: None,
            fence_deadline: None,
            slot_corrupt: false,
        }
    }

    fn assessment(now: u64, peers: Vec<PeerAssessment>) -> Assessment {
        Assessment { now: Millis(now), heard: HostSet::EMPTY, disk_alive: HostSet::EMPTY, disk_readable: true, peers, fence: None, has_majority: true }
    }

    fn decide(r: &mut FenceReports, s: &ClusterState, a: &Assessment, own: Option<OwnFence>) -> Vec<(u32, FailoverReason)> {
        let i = FailoverInputs {
            me: HostId(0),
            state: s,
            assessment: a,
            own_fence: own,
            kill_grace_ms: 500,
            now: a.now,
            skip_fence_wait: false,
            deadline_early_ms: 0,
        };
        r.failover_candidates(&i).into_iter().map(|c| (c.host.0, c.reason)).collect()
    }

    /// A dead peer only once its fence deadline passed; a partitioned or unknown one never.
    #[test]
    fn a_dead_host_moves_only_after_its_fence_deadline() {
        let s = cluster(3, 4096);
        let mut r = FenceReports::default();
        let dead = |now| {
            let mut p = peer(1, HostLiveness::Dead);
            p.fence_deadline = Some(Millis(10_000));
            assessment(now, vec![p, peer(2, HostLiveness::Partitioned)])
        };
        assert_eq!(decide(&mut r, &s, &dead(9_999), None), vec![]);
        let after = decide(&mut r, &s, &dead(10_250), None);
        assert_eq!(after, vec![(1, FailoverReason::Dead { net_age_ms: 4000, disk_age_ms: 4000, past_deadline_ms: 250 })]);
        let unknown = assessment(20_000, vec![peer(1, HostLiveness::Unknown), peer(2, HostLiveness::Partitioned)]);
        assert_eq!(decide(&mut r, &s, &unknown, None), vec![]);
    }

    /// A peer's own fence report counts through its current epoch (or a later one), and only once the grace has
    /// passed since the coordinator first saw it; a report of an older epoch never counts.
    #[test]
    fn a_fence_report_counts_after_the_grace_for_the_current_epoch_only() {
        let s = cluster(3, 4096);
        let epoch = s.hosts[&HostId(1)].epoch;
        let mut r = FenceReports::default();
        let reporting = |now, e| {
            let mut p = peer(1, HostLiveness::Alive);
            p.fenced_epoch = Some(e);
            assessment(now, vec![p])
        };
        assert_eq!(decide(&mut r, &s, &reporting(1_000, epoch), None), vec![], "first seen now: the kills get their grace");
        assert_eq!(decide(&mut r, &s, &reporting(1_499, epoch), None), vec![]);
        assert_eq!(decide(&mut r, &s, &reporting(1_500, epoch), None), vec![(1, FailoverReason::ReportedFenced)]);
        let mut fresh = FenceReports::default();
        assert_eq!(decide(&mut fresh, &s, &reporting(1_000, epoch - 1), None), vec![]);
        assert_eq!(decide(&mut fresh, &s, &reporting(9_000, epoch - 1), None), vec![], "an old epoch's fence says nothing of this one");
        // A report that stops and comes back is graced again from its return.
        assert_eq!(decide(&mut r, &s, &assessment(2_000, vec![peer(1, HostLiveness::Alive)]), None), vec![]);
        assert_eq!(decide(&mut r, &s, &reporting(2_100, epoch), None), vec![]);
        // "Fenced through" a later epoch covers the committed one: a host whose rejoin committed
        // while it was cut off, and that gave that join up.
        let mut through = FenceReports::default();
        assert_eq!(decide(&mut through, &s, &reporting(1_000, epoch + 1), None), vec![]);
        assert_eq!(decide(&mut through, &s, &reporting(1_500, epoch + 1), None), vec![(1, FailoverReason::ReportedFenced)]);
    }

    /// The coordinator moves its own VMs only while committed state has it in an epoch it has
    /// promised never to run VMs in again.
    #[test]
    fn the_coordinators_own_fence_counts_only_for_promised_epochs() {
        let s = cluster(3, 4096);
        let epoch = s.hosts[&HostId(0)].epoch;
        let mut r = FenceReports::default();
        let fence = |promised_through| Some(OwnFence { reason: FenceReason::Stopping, confirmed_at: Some(Millis(0)), promised_through });
        assert_eq!(decide(&mut r, &s, &assessment(5_000, vec![]), fence(epoch - 1)), vec![], "a join it may still accept committed epoch {epoch}");
        assert_eq!(decide(&mut r, &s, &assessment(5_000, vec![]), fence(epoch)), vec![(0, FailoverReason::OwnFence(FenceReason::Stopping))]);
    }

    /// The coordinator's own fence counts once every exit is confirmed and the grace passed.
    #[test]
    fn the_coordinators_own_fence_waits_for_confirmed_exits_and_the_grace() {
        let s = cluster(3, 4096);
        let mut r = FenceReports::default();
        let a = |now| assessment(now, vec![]);
        let fence = |confirmed_at| Some(OwnFence { reason: FenceReason::Stopping, confirmed_at, promised_through: u64::MAX });
        assert_eq!(decide(&mut r, &s, &a(5_000), fence(None)), vec![]);
        assert_eq!(decide(&mut r, &s, &a(5_000), fence(Some(Millis(4_800)))), vec![]);
        assert_eq!(decide(&mut r, &s, &a(5_300), fence(Some(Millis(4_800)))), vec![(0, FailoverReason::OwnFence(FenceReason::Stopping))]);
    }
}
