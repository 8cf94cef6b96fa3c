//! When the VMs parked with a host's planned stop may run elsewhere, sans I/O.
//!
//! A host that left with the `shutdown` policy gives its parked VMs a hold: if it has not come
//! back by then, they are released to run elsewhere. The hold is counted on the coordinator's
//! clock from when this coordinator first saw the host left; a new leader starts counting again,
//! so a leader change can only make the release later, never earlier.

use crate::hostset::HostId;
use crate::state::{ClusterState, HostStatus};
use crate::time::Millis;
use std::collections::BTreeMap;

/// What the coordinator remembers between passes.
#[derive(Clone, Debug, Default)]
pub struct ParkedHolds {
    first_seen: BTreeMap<HostId, Millis>,
}

impl ParkedHolds {
    /// The left hosts whose parked VMs may be released now: the shortest hold among them has
    /// passed since this coordinator first saw the host left. Hosts without a hold (`freeze`)
    /// never are.
    pub fn due(&mut self, s: &ClusterState, now: Millis) -> Vec<HostId> {
        let mut holds: BTreeMap<HostId, u64> = BTreeMap::new();
        for (host, hold) in s.vms.values().filter_map(|v| v.parked()) {
            let left = s.hosts.get(&host).is_some_and(|h| h.status == HostStatus::Left);
            if let (true, Some(ms)) = (left, hold) {
                let e = holds.entry(host).or_insert(ms);
                *e = (*e).min(ms);
            }
        }
        self.first_seen.retain(|h, _| holds.contains_key(h));
        holds.into_iter().filter(|(h, ms)| now.since(*self.first_seen.entry(*h).or_insert(now)) >= *ms).map(|(h, _)| h).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cluster, process_vm, run_on};
    use crate::state::{Command, Protection};

    #[test]
    fn a_hold_is_counted_from_when_the_coordinator_saw_the_leave_and_freeze_never_releases() {
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 512), 0);
        run_on(&mut s, process_vm("f", Protection::Protect, 0, 512), 1);
        let mut holds = ParkedHolds::default();
        assert!(holds.due(&s, Millis(0)).is_empty());
        let e0 = s.hosts[&HostId(0)].epoch;
        s.apply(&Command::HostLeave { host: HostId(0), epoch: e0, hold_ms: Some(5_000) }).expect("leave");
        let e1 = s.hosts[&HostId(1)].epoch;
        s.apply(&Command::HostLeave { host: HostId(1), epoch: e1, hold_ms: None }).expect("leave");
        assert!(holds.due(&s, Millis(10_000)).is_empty(), "first seen now");
        assert!(holds.due(&s, Millis(14_999)).is_empty());
        assert_eq!(holds.due(&s, Millis(15_000)), vec![HostId(0)], "host 1 froze: never");
        // A new coordinator counts again from its own first sight.
        let mut fresh = ParkedHolds::default();
        assert!(fresh.due(&s, Millis(15_000)).is_empty());
        // Back before the release: nothing is due any more.
        s.apply(&Command::HostJoined { host: HostId(0) }).expect("back");
        assert!(holds.due(&s, Millis(99_000)).is_empty());
    }
}
