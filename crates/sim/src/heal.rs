//! A heal that reaches a host unevenly: a host cut off from everything hears the others again
//! at once, and they hear its heartbeats only later (within a peer timeout), while its API
//! calls — and so the consensus — go through; in half the runs another host is cut off before
//! they do. Real heals are uneven (a route, a firewall rule, a relay comes back one direction
//! at a time), and the fault suite found a healthy host fenced in that window. The host back
//! must not fence once the heal began; only the second host cut off may.

use super::*;

impl Sim {
    pub(super) async fn partition_uneven_heal(&mut self, kind: FaultKind, target: u32, hold: Duration, now: u64) {
        let w = Arc::clone(&self.world);
        let n = self.hosts.len() as u32;
        // Two hosts: the host cut off is the one a cut of their link leaves fenced.
        let target = if self.two_with_witness() { self.link_cut_loser() } else { target };
        let others: Vec<u32> = (0..n).filter(|o| *o != target).collect();
        let before = self.vms_on(target).await;
        let peer_timeout = self.opts.timings.unwrap_or_default().peer_timeout_ms;
        // The heartbeats follow while the words the others spoke without hearing them are
        // still within a peer timeout of the heal: a link broken one way for longer is a real
        // one, whose verdict may fence the host that is not heard.
        let lag = 200 + self.rand(peer_timeout.saturating_sub(400).max(1));
        let candidates: Vec<u32> = self.up().into_iter().filter(|h| *h != target && self.hosts[*h as usize].member).collect();
        let second = match self.rand(2) {
            0 => None,
            _ => candidates.get(self.rand(candidates.len().max(1) as u64) as usize).copied(),
        };
        let second_at = 100 + self.rand(lag.saturating_sub(100).max(1));
        let second_hold = Duration::from_millis(3_000 + self.rand(9_000));
        w.log(format!("FAULT {kind} h{target} for {hold:?}; its heartbeats {lag} ms after the rest"));
        self.isolate(target, false);
        self.excuse_only(&[target], now + hold.as_millis() as u64 + 15_000);
        self.run_for(hold).await;
        if hold.as_millis() as u64 > 9_000 && !before.is_empty() {
            self.check_moved_off(target, &before, &format!("{kind} of h{target}")).await;
            self.recoveries.owe(now, format!("{kind} of h{target}"), &self.restartable(&before), &[]);
        }
        {
            let mut c = lock(&w.cond);
            c.blocked.clear();
            c.heartbeats_blocked.extend(others.iter().map(|o| (target, *o)));
        }
        w.log(format!("HEAL {kind} h{target}: all but its heartbeats"));
        // Its own fence came in the cut; from the heal on, it hears the others and must not
        // fence (a fence already decided is collected within a poll).
        self.hosts[target as usize].excused_until = w.now_ms() + 500;
        let Some(second) = second else {
            self.run_for(Duration::from_millis(lag)).await;
            lock(&w.cond).heartbeats_blocked.clear();
            w.log(format!("HEAL {kind}: h{target}'s heartbeats"));
            return;
        };
        self.run_for(Duration::from_millis(second_at)).await;
        let cut_at = w.now_ms();
        let second_vms = self.vms_on(second).await;
        w.log(format!("FAULT {kind}: h{second} cut off from everything for {second_hold:?}"));
        // Its disk path too, so that it says nothing more: its last words — that it does not
        // hear the host back — were spoken within a peer timeout of the heal. (On the disk it
        // would go on saying so for a peer timeout after it, which is a link broken one way
        // for that long, and the lower id would then win as the partition rule says.)
        self.isolate(second, true);
        self.excuse_only(&[second], cut_at + second_hold.as_millis() as u64 + 15_000);
        self.run_for(Duration::from_millis(lag - second_at)).await;
        lock(&w.cond).heartbeats_blocked.clear();
        w.log(format!("HEAL {kind}: h{target}'s heartbeats"));
        self.run_for(second_hold.saturating_sub(Duration::from_millis(lag - second_at))).await;
        if second_hold.as_millis() as u64 > 9_000 && !second_vms.is_empty() {
            self.check_moved_off(second, &second_vms, &format!("{kind} of h{second}")).await;
            self.recoveries.owe(cut_at, format!("{kind} of h{second}"), &self.restartable(&second_vms), &[]);
        }
        lock(&w.cond).blocked.clear();
        w.heal_disks();
        w.log(format!("HEAL {kind} h{second}"));
    }

    /// Cuts `host` off from every other host, both ways (and off its disk path if `disk`).
    pub(super) fn isolate(&self, host: u32, disk: bool) {
        let n = self.hosts.len() as u32;
        {
            let mut c = lock(&self.world.cond);
            for o in (0..n).filter(|o| *o != host) {
                c.blocked.insert((host, o));
                c.blocked.insert((o, host));
            }
        }
        if disk {
            self.world.set_disk_mode(host, DiskMode::Fail);
        }
    }
}
