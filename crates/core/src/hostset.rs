//! Host identities and compact sets of them.

use serde::{Deserialize, Serialize};

/// The largest number of hosts in one cluster: one heartbeat-disk slot and one bit each.
pub const MAX_HOSTS: usize = 64;

/// A host's index in the cluster, `0..MAX_HOSTS`. It is also its heartbeat-disk slot number and
/// its consensus node id, so it is fixed in the host's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct HostId(pub u32);

impl HostId {
    /// Whether the id fits in a [`HostSet`] and a disk slot.
    #[must_use]
    pub fn is_valid(self) -> bool {
        (self.0 as usize) < MAX_HOSTS
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A set of hosts as a 64-bit mask: what a host hears, which slots are fresh, a partition side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct HostSet(pub u64);

impl HostSet {
    /// The empty set.
    pub const EMPTY: HostSet = HostSet(0);

    /// A set holding only `h` (empty when `h` is out of range).
    #[must_use]
    pub fn single(h: HostId) -> HostSet {
        let mut s = HostSet::EMPTY;
        s.insert(h);
        s
    }

    /// Adds `h`; ids out of range are ignored (they are rejected where they enter the system).
    pub fn insert(&mut self, h: HostId) {
        if h.is_valid() {
            self.0 |= 1u64 << h.0;
        }
    }

    /// Removes `h`.
    pub fn remove(&mut self, h: HostId) {
        if h.is_valid() {
            self.0 &= !(1u64 << h.0);
        }
    }

    #[must_use]
    pub fn contains(self, h: HostId) -> bool {
        h.is_valid() && self.0 & (1u64 << h.0) != 0
    }

    #[must_use]
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    #[must_use]
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    #[must_use]
    pub fn is_subset_of(self, other: HostSet) -> bool {
        self.0 & !other.0 == 0
    }

    #[must_use]
    pub fn intersect(self, other: HostSet) -> HostSet {
        HostSet(self.0 & other.0)
    }

    /// The lowest host id in the set.
    #[must_use]
    pub fn min(self) -> Option<HostId> {
        (self.0 != 0).then(|| HostId(self.0.trailing_zeros()))
    }

    /// Hosts in ascending id order.
    pub fn iter(self) -> impl Iterator<Item = HostId> {
        (0..MAX_HOSTS as u32).map(HostId).filter(move |h| self.contains(*h))
    }
}

impl FromIterator<HostId> for HostSet {
    fn from_iter<I: IntoIterator<Item = HostId>>(iter: I) -> Self {
        let mut s = HostSet::EMPTY;
        for h in iter {
            s.insert(h);
        }
        s
    }
}

impl std::fmt::Display for HostSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.iter().map(|h| h.0.to_string()).collect();
        write!(f, "{{{}}}", ids.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations() {
        let s: HostSet = [HostId(0), HostId(3), HostId(63)].into_iter().collect();
        assert_eq!(s.len(), 3);
        assert!(s.contains(HostId(63)));
        assert!(!s.contains(HostId(64)));
        assert_eq!(s.min(), Some(HostId(0)));
        assert!(HostSet::single(HostId(3)).is_subset_of(s));
        assert!(!s.is_subset_of(HostSet::single(HostId(3))));
        assert_eq!(s.iter().map(|h| h.0).collect::<Vec<_>>(), vec![0, 3, 63]);
        assert_eq!(s.to_string(), "{0,3,63}");
        let mut t = s;
        t.insert(HostId(99));
        assert_eq!(t, s, "out-of-range ids are ignored");
    }
}
