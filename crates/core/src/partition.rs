//! Partition survival: which hosts keep running when the network splits.
//!
//! Every host evaluates [`decide`] on the same inputs — the heard-sets that each host wrote in its
//! heartbeat-disk slot — so every host reaches the same verdict without talking to the others.

use crate::hostset::{HostId, HostSet, MAX_HOSTS};
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
/// (Without a preferred site: see [`decide_preferring`].)
///
/// Cost: O(n²) set operations on 64-bit host sets. (It ran once per heartbeat interval on every
/// host whenever the cluster was not fully connected — during every join — and the first
/// version, which looked the heard-sets up again for every pair inside every candidate side,
/// took most of two cores with 64 agents while they joined.)
#[must_use]
pub fn decide(members: HostSet, disk_alive: HostSet, heard: &BTreeMap<HostId, HostSet>) -> Survival {
    decide_preferring(members, HostSet::EMPTY, HostSet::EMPTY, disk_alive, heard)
}

/// [`decide`], where `preferred` are the hosts of the cluster's preferred site and `fenced` the
/// hosts that report themselves fenced. Of the sides that hold no majority (a cut between two
/// sites of equal weight, or two hosts and their witness), one with a host not fenced wins
/// first — a side of fenced hosts runs nothing, and letting it win stopped the one host that
/// ran every VM (a host cut off and fenced, back on the disk before its heartbeats reached its
/// peer: two singleton sides, the lower id, fenced, won) — then one with a preferred host,
/// then the larger, then the lowest id. A side with a majority still wins over any other: these
/// only break what the votes leave open, so they never keep a side that could not commit.
#[must_use]
pub fn decide_preferring(members: HostSet, preferred: HostSet, fenced: HostSet, disk_alive: HostSet, heard: &BTreeMap<HostId, HostSet>) -> Survival {
    let mut reported = [HostSet::EMPTY; MAX_HOSTS];
    for h in disk_alive.iter() {
        reported[h.0 as usize] = heard.get(&h).copied().unwrap_or(HostSet::single(h));
    }
    let all_connected = disk_alive.iter().all(|h| disk_alive.is_subset_of(reported[h.0 as usize]));
    if all_connected {
        return Survival::NoPartition;
    }
    // adjacent[a]: a itself and every disk-alive host that a and which hear each other.
    let mut adjacent = [HostSet::EMPTY; MAX_HOSTS];
    for a in disk_alive.iter() {
        let mut side = HostSet::single(a);
        for b in disk_alive.intersect(reported[a.0 as usize]).iter() {
            if reported[b.0 as usize].contains(a) {
                side.insert(b);
            }
        }
        adjacent[a.0 as usize] = side;
    }
    let is_clique = |side: HostSet| side.iter().all(|a| side.is_subset_of(adjacent[a.0 as usize]));
    let majority = members.len() / 2 + 1;
    let rank = |side: HostSet| {
        let has_majority = side.intersect(members).len() >= majority;
        let runs = !side.is_subset_of(fenced);
        let prefers = !side.intersect(preferred).is_empty();
        // Lower id ranks higher, so invert it for a max-comparison.
        let low = side.min().map_or(0, |h| u32::MAX - h.0);
        (has_majority, runs, prefers, side.len(), low)
    };
    let mut best: Option<HostSet> = None;
    for h in disk_alive.iter() {
        for side in [adjacent[h.0 as usize], HostSet::single(h)] {
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

    /// Two hosts (with their witness), or two sites of two: the preferred site's side wins the
    /// tie that the lowest id would otherwise break; it does not win against a majority.
    #[test]
    fn a_split_without_a_majority_keeps_the_preferred_site() {
        let heard = views(&[(0, &[0]), (1, &[1])]);
        assert_eq!(decide(set(&[0, 1]), set(&[0, 1]), &heard), Survival::Split { winner: set(&[0]) });
        assert_eq!(decide_preferring(set(&[0, 1]), set(&[1]), HostSet::EMPTY, set(&[0, 1]), &heard), Survival::Split { winner: set(&[1]) });
        let four = views(&[(0, &[0, 1]), (1, &[0, 1]), (2, &[2, 3]), (3, &[2, 3])]);
        assert_eq!(decide_preferring(set(&[0, 1, 2, 3]), set(&[2, 3]), HostSet::EMPTY, set(&[0, 1, 2, 3]), &four), Survival::Split { winner: set(&[2, 3]) });
        // Before size, too: one preferred host left on its side against two others.
        let three = views(&[(0, &[0, 1]), (1, &[0, 1]), (2, &[2])]);
        assert_eq!(decide_preferring(set(&[0, 1, 2, 3]), set(&[2, 3]), HostSet::EMPTY, set(&[0, 1, 2]), &three), Survival::Split { winner: set(&[2]) });
        // A majority wins whatever the preference.
        let maj = views(&[(0, &[0]), (1, &[1, 2]), (2, &[1, 2])]);
        assert_eq!(decide_preferring(set(&[0, 1, 2]), set(&[0]), HostSet::EMPTY, set(&[0, 1, 2]), &maj), Survival::Split { winner: set(&[1, 2]) });
    }

    /// Where no side holds a majority, a side with a host not fenced wins over one of fenced
    /// hosts only, before the preferred site and the lowest id; a majority still wins.
    #[test]
    fn a_split_without_a_majority_keeps_a_side_that_is_not_fenced() {
        let heard = views(&[(0, &[0]), (1, &[1])]);
        let two = set(&[0, 1]);
        assert_eq!(decide_preferring(two, HostSet::EMPTY, set(&[0]), two, &heard), Survival::Split { winner: set(&[1]) });
        assert_eq!(decide_preferring(two, set(&[0]), set(&[0]), two, &heard), Survival::Split { winner: set(&[1]) }, "before the preferred site");
        assert_eq!(decide_preferring(two, HostSet::EMPTY, two, two, &heard), Survival::Split { winner: set(&[0]) }, "both fenced: the lowest id");
        let maj = views(&[(0, &[0]), (1, &[1, 2]), (2, &[1, 2])]);
        let three = set(&[0, 1, 2]);
        assert_eq!(decide_preferring(three, HostSet::EMPTY, set(&[1, 2]), three, &maj), Survival::Split { winner: set(&[1, 2]) }, "a majority, fenced or not");
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

    /// The first implementation, kept as the reference the faster one must agree with.
    fn decide_reference(members: HostSet, preferred: HostSet, fenced: HostSet, disk_alive: HostSet, heard: &BTreeMap<HostId, HostSet>) -> Survival {
        let reported = |h: HostId| heard.get(&h).copied().unwrap_or(HostSet::single(h));
        if disk_alive.iter().all(|h| disk_alive.is_subset_of(reported(h))) {
            return Survival::NoPartition;
        }
        let mutual = |a: HostId, b: HostId| a == b || (reported(a).contains(b) && reported(b).contains(a));
        let neighbourhood = |h: HostId| -> HostSet { disk_alive.iter().filter(|g| mutual(h, *g)).collect() };
        let is_clique = |side: HostSet| side.iter().all(|a| side.iter().all(|b| mutual(a, b)));
        let majority = members.len() / 2 + 1;
        let rank = |side: HostSet| {
            let runs = side.iter().any(|h| !fenced.contains(h));
            (side.intersect(members).len() >= majority, runs, !side.intersect(preferred).is_empty(), side.len(), side.min().map_or(0, |h| u32::MAX - h.0))
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

    proptest! {
        /// The O(n²) verdict is the reference verdict, on random hearing graphs of up to 64 hosts
        /// (dense and sparse, hosts missing from the disk, hosts with no heard-set).
        #[test]
        fn the_fast_verdict_is_the_reference_verdict(
            n in 1u32..=64,
            density in 0u32..=100,
            seed in any::<u64>(),
            alive_mask in any::<u64>(),
            members_mask in any::<u64>(),
            preferred_mask in any::<u64>(),
            fenced_mask in any::<u64>(),
        ) {
            let mut x = seed | 1;
            let mut next = move || { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x };
            let members: HostSet = (0..n).filter(|i| members_mask & (1 << i) != 0 || *i == 0).map(HostId).collect();
            let alive: HostSet = (0..n).filter(|i| alive_mask & (1 << i) != 0).map(HostId).collect();
            let mut heard: BTreeMap<HostId, HostSet> = BTreeMap::new();
            for a in alive.iter() {
                // One host in ten has no heard-set on record.
                if next() % 10 == 0 {
                    continue;
                }
                let mut s = HostSet::single(a);
                for b in 0..n { if (next() % 100) < u64::from(density) { s.insert(HostId(b)); } }
                heard.insert(a, s);
            }
            // Half the cases without a preferred site, half with a random one.
            let preferred: HostSet = if seed % 2 == 0 { HostSet::EMPTY } else { (0..n).filter(|i| preferred_mask & (1 << i) != 0).map(HostId).collect() };
            // A third of the cases with some hosts fenced.
            let fenced: HostSet = if seed % 3 == 0 { (0..n).filter(|i| fenced_mask & (1 << i) != 0).map(HostId).collect() } else { HostSet::EMPTY };
            prop_assert_eq!(decide_preferring(members, preferred, fenced, alive, &heard), decide_reference(members, preferred, fenced, alive, &heard));
        }
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
