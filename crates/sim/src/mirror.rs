//! The simulated disks mirrored between sites. Each site holds a copy of a mirrored VM's disk;
//! the model keeps, per VM, how many writes its guest has had acknowledged (`acked`) and how
//! many each site's copy holds. A running guest writes once per mirror pass of its host
//! (`step`): the write is held — not acknowledged — while a link's copy is lost and not
//! released; otherwise it is acknowledged, and lands on the running site's copy and on every
//! copy whose link is in sync. A link's mirror copies (`Copying`, a few passes), is in sync,
//! or is stopped (released: its copy misses what is written since). A VM that starts at a site
//! whose copy lacks an acknowledged write has lost it: the `stale-copy` invariant.
//!
//! A link's copy is reachable while its server host is up, not frozen, and the network carries
//! both ways between the hosts: otherwise the relay is `Lost`, as the real one is after its stall.

use crate::world::{lock, World};
use std::collections::BTreeMap;
use tandem_core::mirroring::RelayPhase;
use tandem_drivers::syncmirror::{MirrorSample, MirrorStatus};

/// Passes a simulated mirror takes to copy what its copy lacks.
pub const SIM_COPY_PASSES: u32 = 3;

/// One VM's copies.
#[derive(Clone, Debug, Default)]
pub struct SiteCopies {
    /// Writes the guest had acknowledged.
    pub acked: u64,
    /// Writes each site's copy holds.
    pub at: BTreeMap<String, u64>,
}

/// A mirror job, simulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimJob {
    Copying { left: u32 },
    InSync,
    Stopped,
}

/// Which copy a link's disk runs on (the real driver's `pathswitch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimPath {
    /// Its site's copy.
    Local,
    /// Its site's storage failed a request: the guest is paused.
    Failed,
    /// The link's copy, since a switch; `back`: the mirror back into the site's copy.
    Other { back: Option<SimJob> },
}

/// One disk's link from the host running its VM to another site's copy.
#[derive(Clone, Debug)]
pub struct SimLink {
    pub server: u32,
    pub site: String,
    pub job: SimJob,
    pub relay: RelayPhase,
    pub path: SimPath,
    /// Paused for the way back (between `Pause` and `Finish`/`Resume`).
    pub paused: bool,
    /// The disk's connection to its local copy server was cut (the real driver's `localcopy`):
    /// its site's copy is out of this guest's reach until a way back serves it anew.
    pub cut: bool,
}

impl SimLink {
    #[must_use]
    pub fn new(server: u32, site: String) -> SimLink {
        SimLink { server, site, job: SimJob::Copying { left: SIM_COPY_PASSES }, relay: RelayPhase::Open, path: SimPath::Local, paused: false, cut: false }
    }
}

/// Whether `site`'s storage answers (with data: neither failing nor hung).
pub fn storage_up(w: &World, site: &str) -> bool {
    !lock(&w.storage_down).contains(site) && !storage_hung(w, site)
}

/// Whether `site`'s storage answers no request at all: a guest's requests to it wait until the
/// disk is cut from its local copy server (the real QEMU's NBD client fails them then).
pub fn storage_hung(w: &World, site: &str) -> bool {
    lock(&w.storage_hung).contains(site)
}

/// The site of host `h` (none: no site).
pub fn site_of(w: &World, h: u32) -> Option<String> {
    lock(&w.sites).get(h as usize).cloned()
}

/// Whether `server` serves its copy to `me` now (its site's storage answering: the real relay
/// holds a copy server's error replies as a lost copy).
fn reachable(w: &World, me: u32, server: u32) -> bool {
    w.reaches(me, server) && w.reaches(server, me) && !w.is_frozen(server) && site_of(w, server).is_none_or(|s| storage_up(w, &s))
}

/// A copy of `name` begins to run at `host`'s site. Why that is wrong, if that site's copy
/// lacks a write the guest had acknowledged.
pub fn runs(w: &World, name: &str, host: u32) -> Option<String> {
    let site = site_of(w, host)?;
    let copies = lock(&w.site_copies);
    let c = copies.get(name)?;
    let here = c.at.get(&site).copied().unwrap_or(0);
    (here < c.acked).then(|| format!("{name} starts on h{host} from site {site}'s copy, which holds {here} of the {} writes its guest acknowledged", c.acked))
}

/// One mirror pass of `name` running on `me` with `links`: the links' states move on, and the
/// guest writes once (held while a link's copy is lost and not released).
pub fn step(w: &World, name: &str, me: u32, links: &mut BTreeMap<usize, SimLink>) {
    let hold = !w.mirror_without_hold.load(std::sync::atomic::Ordering::SeqCst);
    for l in links.values_mut() {
        let up = reachable(w, me, l.server);
        l.relay = match (l.relay, up) {
            (RelayPhase::Open, false) if hold => RelayPhase::Lost,
            // The mutation: the copy's failed writes complete at once, as if released.
            (RelayPhase::Open, false) => {
                l.job = SimJob::Stopped;
                RelayPhase::Released
            }
            (RelayPhase::Released, true) => RelayPhase::Open,
            (r, _) => r,
        };
    }
    let Some(site) = site_of(w, me) else { return };
    // Failing (errors) and hung (no answer) are told apart: a hang fails no request.
    let local_hung = storage_hung(w, &site);
    let local_fails = !local_hung && lock(&w.storage_down).contains(&site);
    let mut copies = lock(&w.site_copies);
    let c = copies.entry(name.to_string()).or_default();
    for l in links.values_mut() {
        match l.path {
            // The guest's next request fails: it pauses, the request kept.
            SimPath::Local if local_fails => l.path = SimPath::Failed,
            SimPath::Other { back: Some(SimJob::Copying { .. } | SimJob::InSync) } if local_fails => l.path = SimPath::Other { back: Some(SimJob::Stopped) },
            // Hung: the way back's writes wait there, and it makes no progress.
            // The way back copies in rounds (QEMU's driver: `pathswitch::catchup`): "in sync"
            // means little is left, not that the site's copy has every write — only the last
            // round, at the pause before the commit, completes it (`return_to_local`).
            SimPath::Other { back: Some(SimJob::Copying { .. }) } if local_hung => {}
            SimPath::Other { back: Some(SimJob::Copying { left }) } if l.relay == RelayPhase::Open => {
                let back = if left <= 1 { SimJob::InSync } else { SimJob::Copying { left: left - 1 } };
                l.path = SimPath::Other { back: Some(back) };
            }
            _ => {}
        }
        if let (SimJob::Copying { left }, RelayPhase::Open, SimPath::Local) = (l.job, l.relay, l.path) {
            l.job = if left <= 1 { SimJob::InSync } else { SimJob::Copying { left: left - 1 } };
            if l.job == SimJob::InSync {
                let here = c.at.get(&site).copied().unwrap_or(0);
                c.at.insert(l.site.clone(), here);
            }
        }
    }
    // Paused (a failed request, or the pause of the way back), or held for a lost copy: no
    // write is acknowledged.
    if links.values().any(|l| l.relay == RelayPhase::Lost || l.path == SimPath::Failed || l.paused) {
        return;
    }
    // Its own copy hung: the write waits there, not acknowledged — on the other copy too while
    // a way back writes into it (a guest write waits for its copy of the old data to land).
    let waits_on_local = |l: &SimLink| match l.path {
        SimPath::Local | SimPath::Failed => true,
        SimPath::Other { back } => matches!(back, Some(SimJob::Copying { .. } | SimJob::InSync)),
    };
    if local_hung && links.values().any(waits_on_local) {
        return;
    }
    c.acked += 1;
    let n = c.acked;
    // On another site's copy: the write lands there (the site's own copy gets it from the way
    // back's rounds, at the latest its last); else on the site's copy and every copy in sync.
    if let Some(on) = links.values().find(|l| matches!(l.path, SimPath::Other { .. })) {
        c.at.insert(on.site.clone(), n);
        return;
    }
    c.at.insert(site, n);
    for l in links.values().filter(|l| l.job == SimJob::InSync && l.relay == RelayPhase::Open) {
        c.at.insert(l.site.clone(), n);
    }
}

/// How the driver reports a link.
pub fn status(l: Option<&SimLink>) -> MirrorStatus {
    let Some(l) = l else { return MirrorStatus { job: MirrorSample::Absent, back: MirrorSample::Absent, relay: RelayPhase::None, lost: None, delta: None } };
    let sample = |j: SimJob| match j {
        SimJob::Copying { left } => MirrorSample::Copying { copied: u64::from(SIM_COPY_PASSES - left.min(SIM_COPY_PASSES)), remaining: u64::from(left) },
        SimJob::InSync => MirrorSample::InSync,
        SimJob::Stopped => MirrorSample::Stopped { missed: 1 },
    };
    // On the other copy the mirror job is gone (completed by the switch).
    let (job, back) = match l.path {
        SimPath::Other { back } => (MirrorSample::Absent, back.map_or(MirrorSample::Absent, sample)),
        SimPath::Local | SimPath::Failed => (sample(l.job), MirrorSample::Absent),
    };
    let lost = (l.relay == RelayPhase::Lost).then(|| format!("h{} unreachable", l.server));
    MirrorStatus { job, back, relay: l.relay, lost, delta: None }
}

/// The host a copy server address names (`sim:N`).
pub fn server_of(address: &str) -> Option<u32> {
    address.strip_prefix("sim:")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(site: &str, server: u32) -> SimLink {
        SimLink::new(server, site.into())
    }

    #[test]
    fn writes_are_held_while_a_copy_is_lost_and_a_stale_copy_is_caught() {
        let w = World::new(1, 2);
        *lock(&w.sites) = vec!["a".into(), "b".into()];
        let mut links = BTreeMap::from([(0, link("b", 1))]);
        for _ in 0..SIM_COPY_PASSES + 2 {
            step(&w, "db", 0, &mut links);
        }
        assert_eq!(links[&0].job, SimJob::InSync);
        let acked = lock(&w.site_copies)["db"].acked;
        assert_eq!(lock(&w.site_copies)["db"].at["b"], acked, "in sync: b holds every acknowledged write");
        assert_eq!(runs(&w, "db", 1), None);
        // The link cut: held, nothing acknowledged.
        lock(&w.cond).blocked.insert((0, 1));
        step(&w, "db", 0, &mut links);
        step(&w, "db", 0, &mut links);
        assert_eq!(links[&0].relay, RelayPhase::Lost);
        assert_eq!(lock(&w.site_copies)["db"].acked, acked);
        assert_eq!(runs(&w, "db", 1), None, "b still holds every acknowledged write");
        // Released (the copy committed stale): writes go on at a alone; b is stale now.
        if let Some(l) = links.get_mut(&0) {
            l.relay = RelayPhase::Released;
            l.job = SimJob::Stopped;
        }
        step(&w, "db", 0, &mut links);
        assert!(runs(&w, "db", 1).is_some_and(|why| why.contains("site b")), "a start at b would lose a write");
        assert_eq!(server_of("sim:3"), Some(3));
    }
}
