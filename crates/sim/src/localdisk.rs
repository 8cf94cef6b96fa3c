//! The simulated local disks: a VM with a writable local disk (`local = true`) has one copy of
//! it per host, and only the copy its running guest writes is current. The model keeps, per VM,
//! a version for each host's copy and the latest one: a copy that begins to run (a start, or a
//! resume after a migration) writes its host's disk, which becomes the latest; a live migration
//! mirrors the source's disk to the destination, in sync at the switch. A start or resume on a
//! host whose copy is older than the latest would run the guest from a stale disk — writes it
//! acknowledged elsewhere gone — which is the `stale-disk` invariant.

use crate::world::{lock, World};
use std::collections::BTreeMap;

/// One VM's local disk copies.
#[derive(Clone, Debug, Default)]
pub struct DiskCopies {
    /// The newest version any copy holds (0: never written).
    pub latest: u64,
    /// Each host's copy's version.
    pub at: BTreeMap<u32, u64>,
}

/// A copy of `name` begins to run on `host` (writing its disk there). Why that is wrong, if its
/// disk there is older than the latest.
pub fn runs(w: &World, name: &str, host: u32) -> Option<String> {
    let mut disks = lock(&w.local_disks);
    let d = disks.entry(name.to_string()).or_default();
    let here = d.at.get(&host).copied().unwrap_or(0);
    let stale = (here < d.latest).then(|| {
        let newest: Vec<u32> = d.at.iter().filter(|(_, v)| **v == d.latest).map(|(h, _)| *h).collect();
        format!("{name} runs on h{host} from its local disk at version {here}; the latest, {}, is on {newest:?}", d.latest)
    });
    d.latest += 1;
    d.at.insert(host, d.latest);
    stale
}

/// A live migration's mirror brought the destination's copy level with the source's.
pub fn mirrored(w: &World, name: &str, from: u32, to: u32) {
    let mut disks = lock(&w.local_disks);
    let d = disks.entry(name.to_string()).or_default();
    let v = d.at.get(&from).copied().unwrap_or(0);
    d.at.insert(to, v);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_runs_only_from_the_latest_disk() {
        let w = World::new(1, 3);
        assert_eq!(runs(&w, "a", 0), None, "a first start has nothing to be behind");
        assert_eq!(runs(&w, "a", 0), None, "a restart on the same host reads its own latest writes");
        assert!(runs(&w, "a", 1).is_some_and(|why| why.contains("h1") && why.contains("[0]")), "another host's copy was never written");
        mirrored(&w, "a", 1, 2);
        assert_eq!(runs(&w, "a", 2), None, "a migration's destination has the mirrored disk");
    }
}
