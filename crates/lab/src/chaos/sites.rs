//! The suite's site faults, injected when the hosts have sites (`--sites`): every host of the
//! target's site powered off at once, or the link between the target's site and another cut,
//! both ways or only what the first sends (nftables on each host of the first). A lost site's
//! VMs must run again on the hosts left when they are a majority, or when a witness gives the
//! one host left of two its vote; a cut leaves one side standing — the one the partition decision
//! picks — whose hosts must not fence, and the other side's VMs must come back on it.

use super::Suite;
use anyhow::Result;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tandem_sim::oracle::{Invariant, Violation};

impl Suite {
    /// Each site's hosts, in name order.
    fn sites(&self) -> Vec<(String, Vec<usize>)> {
        let mut out: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, site) in self.lab.opts.sites.iter().enumerate().take(self.lab.hosts.len()) {
            out.entry(site.clone()).or_default().push(i);
        }
        out.into_iter().collect()
    }

    fn site_of(&self, host: usize) -> Option<(String, Vec<usize>)> {
        let site = self.lab.opts.sites.get(host)?;
        self.sites().into_iter().find(|(s, _)| s == site)
    }

    pub(super) fn inject_site_power_loss(&mut self, target: usize, t0: Instant, may_fence: &mut Vec<usize>) -> Result<()> {
        let Some((site, hosts)) = self.site_of(target) else { return Ok(()) };
        let vms = self.vms_on(&hosts);
        let names = self.names(&hosts);
        let left = self.lab.hosts.len() - hosts.len();
        self.log(&format!("site-power-loss: site {site} ({}), {} VM(s); {left} of {} hosts left", names.join(", "), vms.len(), self.lab.hosts.len()));
        for h in &hosts {
            self.lab.power_off(*h);
        }
        may_fence.extend(hosts.iter().copied());
        if left > self.lab.hosts.len() / 2 || self.lab.opts.network_witness.is_some() {
            let took = self.wait_moved("site-power-loss", &vms, &names, t0);
            self.record_recovery(&vms, took, "of the lost site back on the others");
        } else {
            // The half left cannot tell a lost site from a cut: it fences, by design (no third
            // vote yet), and nothing restarts until the site is back.
            may_fence.extend(0..self.lab.hosts.len());
            std::thread::sleep(Duration::from_secs(8));
        }
        for h in &hosts {
            self.lab.start(*h)?;
        }
        Ok(())
    }

    pub(super) fn inject_site_link_cut(&mut self, target: usize, t0: Instant, since_ms: u64, may_fence: &mut Vec<usize>, one_way: bool) -> Result<()> {
        let Some((a, on_a)) = self.site_of(target) else { return Ok(()) };
        let others: Vec<(String, Vec<usize>)> = self.sites().into_iter().filter(|(s, _)| *s != a).collect();
        if others.is_empty() {
            return Ok(());
        }
        let (b, on_b) = others[self.rng.below(others.len() as u64) as usize].clone();
        let placed = [self.vms_on(&on_a), self.vms_on(&on_b)];
        let what = if one_way { "site-link-one-way" } else { "site-link-cut" };
        let (from_a, to_b) = (self.names(&on_a).join(", "), self.names(&on_b).join(", "));
        if one_way {
            self.log(&format!("{what}: nothing site {a} ({from_a}) sends reaches site {b} ({to_b}), which still reaches it"));
        } else {
            self.log(&format!("{what}: site {a} ({from_a}) and site {b} ({to_b}) lose each other"));
        }
        for h in &on_a {
            if one_way {
                self.net.block_outbound_to(*h, &on_b)?;
            } else {
                self.net.block_hosts(*h, &on_b)?;
            }
        }
        may_fence.extend(on_a.iter().chain(on_b.iter()).copied());
        // One side fences (the partition decision picks it); its VMs must come back on the other.
        let mut loser = None;
        while loser.is_none() && t0.elapsed() < super::RECOVERY_BOUND && !super::interrupted() {
            let fenced = self.fenced_since(since_ms);
            loser = [&on_a, &on_b].into_iter().position(|side| side.iter().any(|h| fenced.contains(&self.lab.hosts[*h].name)));
            std::thread::sleep(Duration::from_millis(100));
        }
        match loser {
            Some(k) => {
                let side = [&on_a, &on_b][k];
                let names = self.names(side);
                self.log(&format!("  site {} fenced itself", [&a, &b][k]));
                let took = self.wait_moved(what, &placed[k], &names, t0);
                self.record_recovery(&placed[k], took, "of the losing site back on the other");
            }
            None => self.violation(Violation::new(Invariant::NotRecovered, format!("{what}: neither site {a} nor site {b} fenced itself"))),
        }
        std::thread::sleep(Duration::from_secs(1));
        for h in &on_a {
            self.net.unblock(*h)?;
        }
        Ok(())
    }
}
