//! Partition survival: which hosts keep running when the network splits.
//!
//! Every host evaluates [`decide`] on the same inputs — the heard-sets that each host wrote in its
//! heartbeat-disk slot — so every host reaches the same verdict without talking to the others.

use crate::hostset::{HostId, HostSet};
use std::collections::BTreeMap;

/// The verdict for the whole cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Survival {
    /// Every host alive on disk hears every other one: nothing to decide.
    NoPartition,
    /// The network is split; `winner` keeps running, every other host alive on disk must fence.
    Split { winner: HostSet },
}

impl Survival {
    /// Whether `host` must fence itself under this verdict.
    #[must_use]
    pub fn must_fence(&self, host: HostId) -> bool {
        match self {
            Survival::NoPartition => false,
            Survival::Split { winner } => !winner.contains(host),
        }
    }
}

/// Decides partition survival.
///
/// * `members`: the cluster's voting hosts.
/// * `disk_alive`: hosts whose disk slot is fresh.
/// * `heard`: for each host in `disk_alive`, the set it reports hearing on the network.
///
/// Rule 1: if every disk-alive host hears every other disk-alive host, there is no partition.
/// Otherwise the candidate sides are the groups of hosts that all hear each other both ways; the
/// winner is the candidate that holds a majority of `members`, then the larger, then the one with
/// the lowest host id. Rule 2 follows: when no host is alive on disk there is nothing to split.
#[must_use]
pub fn decide(members: HostSet, disk_alive: HostSet, heard: &BTreeMap<HostId, HostSet>) -> Survival {
    let reported = |h: HostId| heard.get(&h).copied().unwrap_or(HostSet::single(h));
    let all_connected = disk_alive.iter().all(|h| disk_alive.is_subset_of(reported(h)));
    if all_connected {
        return Survival::NoPartition;
    }
    let mutual = |a: HostId, b: HostId| a == b || (reported(a).contains(b) && reported(b).contains(a));
    let neighbourhood = |h: HostId| -> HostSet { disk_alive.iter().filter(|g| mutual(h, *g)).collect() };
    let is_clique = |side: HostSet| side.iter().all(|a| side.iter().all(|b| mutual(a, b)));
    let majority = members.len() / 2 + 1;
    let rank = |side: HostSet| {
        let has_majority = side.intersect(members).len() >= majority;
        // Lower id ranks higher, so invert it for a max-comparison.
        let low = side.min().map_or(0, |h| u32::MAX - h.0);
        (has_majority, side.len(), low)
    };
    let mut best: Option<HostSet> = None;
    for h in disk_alive.iter() {
        for side in [neighbourhood(h), HostSet::single(h)] {
            if is_clique(side) && best.is_none_or(|b| rank(side) > rank(b)) {
                best = Some(side);
            }
        }
    }
    Survival::Split { winner: best.unwrap_or(HostSet::EMPTY) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(ids: &[u32]) -> HostSet {
        ids.iter().map(|i| HostId(*i)).collect()
    }

    fn views(v: &[(u32, &[u32])]) -> BTreeMap<HostId, HostSet> {
        v.iter().map(|(h, s)| (HostId(*h), set(s))).collect()
    }

    #[test]
    fn fully_connected_cluster_has_no_partition() {
        let all = set(&[0, 1, 2]);
        let heard = views(&[(0, &[0, 1, 2]), (1, &[0, 1, 2]), (2, &[0, 1, 2])]);
        assert_eq!(decide(all, all, &heard), Survival::NoPartition);
    }

    #[test]
    fn dead_host_missing_from_disk_is_no_partition() {
        let heard = views(&[(0, &[0, 1]), (1, &[0, 1])]);
        assert_eq!(decide(set(&[0, 1, 2]), set(&[0, 1]), &heard), Survival::NoPartition);
    }

    #[test]
    fn isolated_host_loses_to_the_majority() {
        let heard = views(&[(0, &[0]), (1, &[1, 2]), (2, &[1, 2])]);
        let s = decide(set(&[0, 1, 2]), set(&[0, 1, 2]), &heard);
        assert_eq!(s, Survival::Split { winner: set(&[1, 2]) });
        assert!(s.must_fence(HostId(0)));
        assert!(!s.must_fence(HostId(1)));
    }

    #[test]
    fn even_split_goes_to_the_lowest_id() {
        let heard = views(&[(0, &[0, 1]), (1, &[0, 1]), (2, &[2, 3]), (3, &[2, 3])]);
        let s = decide(set(&[0, 1, 2, 3]), set(&[0, 1, 2, 3]), &heard);
        assert_eq!(s, Survival::Split { winner: set(&[0, 1]) });
    }

    #[test]
    fn one_way_loss_is_not_mutual_hearing() {
        // 0 hears everyone but nobody hears 0: 0 is cut off.
        let heard = views(&[(0, &[0, 1, 2]), (1, &[1, 2]), (2, &[1, 2])]);
        let s = decide(set(&[0, 1, 2]), set(&[0, 1, 2]), &heard);
        assert_eq!(s, Survival::Split { winner: set(&[1, 2]) });
    }

    #[test]
    fn nobody_on_disk_means_nobody_fences() {
        assert_eq!(decide(set(&[0, 1, 2]), HostSet::EMPTY, &BTreeMap::new()), Survival::NoPartition);
    }

    proptest! {
        /// Whatever the hearing graph, there is exactly one winner, it is non-empty, its members all
        /// hear each other, and every host computing the verdict from the same slots agrees.
        #[test]
        fn one_consistent_winner(n in 1u32..8, edges in proptest::collection::vec(any::<bool>(), 64), alive_mask in any::<u8>()) {
            let members: HostSet = (0..n).map(HostId).collect();
            let alive: HostSet = (0..n).filter(|i| alive_mask & (1 << i) != 0).map(HostId).collect();
            let heard: BTreeMap<HostId, HostSet> = alive.iter().map(|a| {
                let mut s = HostSet::single(a);
                for b in 0..n { if edges[(a.0 * 8 + b) as usize] { s.insert(HostId(b)); } }
                (a, s)
            }).collect();
            match decide(members, alive, &heard) {
                Survival::NoPartition => {
                    for a in alive.iter() { prop_assert!(alive.is_subset_of(heard[&a])); }
                }
                Survival::Split { winner } => {
                    prop_assert!(!winner.is_empty());
                    prop_assert!(winner.is_subset_of(alive));
                    for a in winner.iter() { for b in winner.iter() { prop_assert!(heard[&a].contains(b)); } }
                    // A side holding a majority always wins over one that does not.
                    let majority = members.len() / 2 + 1;
                    let any_majority_clique = alive.iter().any(|a| {
                        let side: HostSet = alive.iter().filter(|b| heard[&a].contains(*b) && heard[b].contains(a)).collect();
                        side.len() >= majority && side.iter().all(|x| side.iter().all(|y| heard[&x].contains(y)))
                    });
                    if any_majority_clique { prop_assert!(winner.len() >= majority); }
                }
            }
        }
    }
}
