//! Site faults, drawn when the hosts have sites (`SimOptions::sites`): every host of a site
//! losing power at once, and the link between two sites cut (both ways, or one way on request). The cluster must restart a lost
//! site's restartable VMs whenever the hosts left hold a majority, run no VM twice, and fence
//! no host that a cut leaves on the winning side.

use super::{lock, FaultKind, Sim};
use std::sync::Arc;
use std::time::Duration;

impl Sim {
    /// The sites, each with its member hosts, in name order.
    fn site_members(&self) -> Vec<(String, Vec<u32>)> {
        let mut out: std::collections::BTreeMap<String, Vec<u32>> = std::collections::BTreeMap::new();
        for (i, site) in self.opts.sites.iter().enumerate().take(self.opts.hosts as usize) {
            if self.hosts[i].member {
                out.entry(site.clone()).or_default().push(i as u32);
            }
        }
        out.into_iter().collect()
    }

    /// The site of `host`'s choosing (the drawn target's), or the first one.
    pub(super) fn site_of(&self, host: u32) -> Option<(String, Vec<u32>)> {
        let sites = self.site_members();
        let site = self.opts.sites.get(host as usize).cloned();
        sites.iter().find(|(s, _)| Some(s) == site.as_ref()).or(sites.first()).cloned()
    }

    pub(super) async fn site_power_loss(&mut self, kind: FaultKind, target: u32, hold: Duration, now: u64, until: u64) {
        let w = Arc::clone(&self.world);
        let Some((site, hosts)) = self.site_of(target) else { return };
        let up: Vec<u32> = self.up().into_iter().filter(|h| hosts.contains(h)).collect();
        let mut before = Vec::new();
        for h in &up {
            before.extend(self.vms_on(*h).await);
        }
        let members = self.hosts.iter().filter(|h| h.member).count();
        let left = self.up().into_iter().filter(|h| self.hosts[*h as usize].member && !up.contains(h)).count();
        // Two hosts with a witness: the one left has the witness's vote once the lost site's
        // host is past its fence deadline, and must restart the site's VMs.
        let quorum = left > members / 2 || (self.opts.disk_witness && members == 2 && left == 1);
        w.log(format!("FAULT {kind} site {site} ({up:?}, {} VM(s); {left} of {members} hosts left) for {hold:?}", before.len()));
        self.excuse(&up, until);
        for h in &up {
            self.power_off(*h).await;
        }
        if quorum {
            // The hosts left are a majority: they must restart the site's VMs.
            self.recoveries.owe(now, format!("{kind} of site {site}"), &self.restartable(&before), &[]);
        } else {
            // Half or fewer are left: they cannot tell the lost site from a partition (the
            // shared disk, too, is trusted only on a majority's word), so they fence — by design
            // until a third vote exists. Their fence is excused; nothing is owed until the site
            // is back.
            let all: Vec<u32> = (0..self.opts.hosts).collect();
            self.excuse(&all, until);
        }
        self.run_for(hold).await;
        for h in &up {
            self.boot(*h).await;
        }
        // Its VMs with a local disk waited, parked, for their hosts: back, they run again.
        let parked: Vec<String> = before.iter().filter(|v| self.local_disk_vms.contains(*v)).cloned().collect();
        self.recoveries.owe(w.now_ms(), format!("{kind} of site {site}: back"), &parked, &[]);
    }

    /// A site's storage fails every request for `hold`: VMs running there pause on their
    /// mirrored disks and go on on another site's copy (the copy in sync), then come back; the
    /// copies it serves are lost to their mirrors. Nobody fences; nothing restarts; every
    /// start after is checked against what its copy holds (`stale-copy`).
    pub(super) async fn site_storage_loss(&mut self, kind: FaultKind, target: u32, hold: Duration) {
        let w = Arc::clone(&self.world);
        let Some((site, _)) = self.site_of(target) else { return };
        w.log(format!("FAULT {kind} site {site} for {hold:?}"));
        lock(&w.storage_down).insert(site.clone());
        self.run_for(hold).await;
        lock(&w.storage_down).remove(&site);
        w.log(format!("HEAL {kind} site {site}"));
    }

    /// The target's site's storage hangs — at least long enough for the agents to give up on
    /// it (`SIM_HUNG_STORAGE_RESTART_S`), then answers again. In half the draws it first fails
    /// for a while (its disks switch to the other copy) and hangs a moment after it answers
    /// again — while the way back may be writing into it.
    pub(super) async fn site_storage_hang(&mut self, kind: FaultKind, target: u32, hold: Duration) {
        let w = Arc::clone(&self.world);
        let Some((site, _)) = self.site_of(target) else { return };
        let hold = hold.max(Duration::from_secs(crate::SIM_HUNG_STORAGE_RESTART_S + 6));
        if self.rand(2) == 0 {
            w.log(format!("FAULT {kind} site {site}: its storage fails first"));
            lock(&w.storage_down).insert(site.clone());
            self.run_for(Duration::from_secs(4)).await;
            lock(&w.storage_down).remove(&site);
            self.run_for(Duration::from_millis(self.rand(2_000))).await;
        }
        w.log(format!("FAULT {kind} site {site} for {hold:?}"));
        lock(&w.storage_hung).insert(site.clone());
        self.run_for(hold).await;
        lock(&w.storage_hung).remove(&site);
        w.log(format!("HEAL {kind} site {site}"));
    }

    /// The link between the target's site and another cut for `hold` — both ways, or (with
    /// `one_way`) only what the target's site sends.
    pub(super) async fn site_link_cut(&mut self, kind: FaultKind, target: u32, hold: Duration, until: u64, one_way: bool) {
        let w = Arc::clone(&self.world);
        let sites = self.site_members();
        let Some((a, on_a)) = self.site_of(target) else { return };
        let others: Vec<&(String, Vec<u32>)> = sites.iter().filter(|(s, _)| *s != a).collect();
        if others.is_empty() {
            return;
        }
        let (b, on_b) = others[self.rand(others.len() as u64) as usize].clone();
        let arrow = if one_way { "-/->" } else { "<-/->" };
        w.log(format!("FAULT {kind} site {a} {on_a:?} {arrow} site {b} {on_b:?} for {hold:?}"));
        {
            let mut c = lock(&w.cond);
            for x in &on_a {
                for y in &on_b {
                    c.blocked.insert((*x, *y));
                    if !one_way {
                        c.blocked.insert((*y, *x));
                    }
                }
            }
        }
        // Either side may be the one that must fence (the partition decision picks); the
        // invariants that hold whatever it picks — no VM twice, everything settled after the
        // heal — are checked as always.
        let both: Vec<u32> = on_a.iter().chain(on_b.iter()).copied().collect();
        self.excuse(&both, until);
        self.run_for(hold).await;
        lock(&w.cond).blocked.clear();
        w.log(format!("HEAL {kind}"));
    }
}
