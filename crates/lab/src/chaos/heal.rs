//! The suite's uneven heal, injected only when asked for (`--only partition-uneven-heal`, so
//! that no seed's plan changes): the simulator's fault of that name with real agents. A host is
//! cut off (its switch port down) until its VMs run elsewhere; then its port comes back while
//! nftables on it still drops the heartbeats it sends, for up to most of a peer timeout (a heal
//! that reaches the two ends of a link unevenly); in half the runs another host is cut off
//! before they flow. The host back must not fence once the heal began; the other's VMs must run
//! again on it. (The fault suite found a healthy host fenced in that window, two sites and a
//! network witness.)

use super::Suite;
use anyhow::Result;
use std::time::{Duration, Instant};
use tandem_agent::views::EventKind;
use tandem_sim::fault::FaultKind;
use tandem_sim::oracle::{Invariant, Violation};

/// The agents' peer timeout (the lab runs the default timings): the heartbeats follow within it.
const PEER_TIMEOUT_MS: u64 = tandem_core::timing::DEFAULT_TIMINGS.peer_timeout_ms;

impl Suite {
    pub(super) fn inject_uneven_heal(&mut self, target: usize, t0: Instant, may_fence: &mut Vec<usize>) -> Result<()> {
        let kind = FaultKind::PartitionUnevenHeal.name();
        let name = self.lab.hosts[target].name.clone();
        let vms = self.vms_on(&[target]);
        let lag = Duration::from_millis(300 + self.rng.below(PEER_TIMEOUT_MS - 1_000));
        let others: Vec<usize> = (0..self.lab.hosts.len()).filter(|h| *h != target).collect();
        let second = (self.rng.below(2) == 1).then(|| others[self.rng.below(others.len() as u64) as usize]);
        let second_after = Duration::from_millis(self.rng.below(lag.as_millis() as u64));
        self.log(&format!("{kind}: {name} ({} VM(s)); its heartbeats {} ms after the rest", vms.len(), lag.as_millis()));
        self.net.cut(target)?;
        may_fence.push(target);
        let took = self.wait_moved(kind, &vms, std::slice::from_ref(&name), t0);
        self.record_recovery(&vms, took, "back on the majority");
        std::thread::sleep(Duration::from_secs(1));
        self.net.block_udp_out(target, self.lab.opts.api_port + 1)?;
        self.net.heal(target)?;
        let healed = Instant::now();
        let healed_ms = tandem_drivers::wall_ms();
        let mut second_cut = None;
        if let Some(s) = second {
            std::thread::sleep(second_after);
            let s_name = self.lab.hosts[s].name.clone();
            let s_vms = self.vms_on(&[s]);
            self.log(&format!("  {s_name} ({} VM(s)) cut off before {name}'s heartbeats flow", s_vms.len()));
            self.net.cut(s)?;
            may_fence.push(s);
            second_cut = Some((s, s_name, s_vms, Instant::now()));
        }
        std::thread::sleep(lag.saturating_sub(healed.elapsed()));
        self.net.unblock(target)?;
        self.log(&format!("  {name}'s heartbeats flow again"));
        if let Some((s, s_name, s_vms, cut_at)) = second_cut {
            let took = self.wait_moved(kind, &s_vms, std::slice::from_ref(&s_name), cut_at);
            self.record_recovery(&s_vms, took, &format!("of {s_name} back on {name} and the rest"));
            std::thread::sleep(Duration::from_secs(1));
            self.net.heal(s)?;
        }
        // Its own fence came in the cut (a fence already decided is recorded at once).
        if self.recorded_since(EventKind::Fenced, healed_ms + 500).contains(&name) {
            self.violation(Violation::new(Invariant::HealthyFenced, format!("{kind}: {name} fenced itself after the heal began")));
        }
        Ok(())
    }
}
