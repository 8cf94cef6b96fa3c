//! Faults that stop a host, or a part of it, while the world goes on: a whole-host freeze (with
//! the hardware watchdog that resets a host frozen too long), an agent stall while its VMs die,
//! and a liveness-path stall while the host is cut off.

use super::{lock, FaultKind, Sim, WATCHDOG_RESET_MS};
use std::sync::Arc;
use std::time::Duration;

impl Sim {
    pub(super) async fn host_freeze(&mut self, kind: FaultKind, target: u32, hold: Duration, now: u64, until: u64) {
        let w = Arc::clone(&self.world);
        let before = self.vms_on(target).await;
        let freeze_ms = 500 + self.rand(8_000);
        w.log(format!("FAULT {kind} h{target} ({} VM(s)) for {freeze_ms} ms", before.len()));
        self.excuse(&[target], until);
        lock(&w.cond).frozen.insert(target, tokio::time::Instant::now());
        if freeze_ms > WATCHDOG_RESET_MS && !self.opts.no_watchdog {
            self.run_for(Duration::from_millis(WATCHDOG_RESET_MS)).await;
            w.log(format!("h{target}'s hardware watchdog expires while it is frozen: reset"));
            {
                let mut c = lock(&w.cond);
                c.down.insert(target);
                c.frozen.remove(&target);
            }
            self.power_off(target).await;
            if !before.is_empty() {
                self.recoveries.owe(now, format!("{kind} of h{target}"), &self.restartable(&before), &[]);
            }
            self.run_for(Duration::from_millis(freeze_ms - WATCHDOG_RESET_MS)).await;
            self.boot(target).await;
        } else {
            self.run_for(Duration::from_millis(freeze_ms)).await;
            lock(&w.cond).frozen.remove(&target);
            w.log(format!("HEAL {kind}: h{target} thaws"));
        }
        self.run_for(hold).await;
    }

    pub(super) async fn agent_stall(&mut self, kind: FaultKind, target: u32, hold: Duration, now: u64, until: u64) {
        let w = Arc::clone(&self.world);
        // The agent stalls for longer than its peers' fence deadline while its VMs die
        // (no hardware watchdog to reset the host): the peers restart the VMs, and when
        // the agent runs again its reconcile pass must not restart them from what it knew
        // before the stall — its lease has lapsed, and that is what stops it.
        let before = self.vms_on(target).await;
        let stall_ms = 7_000 + self.rand(2_000);
        w.log(format!("FAULT {kind} h{target} ({} VM(s) die) for {stall_ms} ms", before.len()));
        self.excuse(&[target], until + stall_ms);
        w.power_off_vms(target);
        lock(&w.cond).frozen.insert(target, tokio::time::Instant::now());
        if !before.is_empty() {
            self.recoveries.owe(now, format!("{kind} of h{target}"), &self.restartable(&before), &[]);
        }
        self.run_for(Duration::from_millis(stall_ms)).await;
        lock(&w.cond).frozen.remove(&target);
        w.log(format!("HEAL {kind}: h{target}'s agent runs again"));
        self.run_for(hold).await;
    }

    pub(super) async fn liveness_stall_in_partition(&mut self, kind: FaultKind, target: u32, now: u64) {
        let w = Arc::clone(&self.world);
        // The host is cut off and its liveness path stalls (no heartbeats, no slot I/O,
        // so no fence decision), while its reconciler runs on. Once its lease has lapsed
        // its VMs die (in production the software watchdog kills them at the lease's end,
        // within the kill grace): the reconciler must not restart them here — the lapsed
        // lease is what stops it — for the survivors restart them once the fence deadline
        // passes.
        let before = self.vms_on(target).await;
        let stall = Duration::from_millis(8_000 + self.rand(1_000));
        let t = self.hosts[target as usize].cfg.timings;
        let crash_after = Duration::from_millis(t.self_fence_ms + self.rand(t.kill_grace_ms));
        w.log(format!("FAULT {kind} h{target} ({} VM(s)) for {stall:?}; its VMs crash after {crash_after:?}", before.len()));
        self.excuse(&[target], now + stall.as_millis() as u64 + 15_000);
        lock(&w.cond).liveness_stalled.insert(target);
        self.isolate(target, false);
        self.run_for(crash_after).await;
        w.log(format!("h{target}'s VMs crash"));
        w.power_off_vms(target);
        if !before.is_empty() {
            self.recoveries.owe(now, format!("{kind} of h{target}"), &self.restartable(&before), &[]);
        }
        self.run_for(stall.saturating_sub(crash_after)).await;
        {
            let mut c = lock(&w.cond);
            c.liveness_stalled.remove(&target);
            c.blocked.clear();
        }
        w.log(format!("HEAL {kind} h{target}"));
        self.run_for(Duration::from_secs(6)).await;
    }
}
