//! The watchdogs: a software thread that fences the host when the liveness loop stalls (a
//! stalled runtime still kills its VMs in time), and the hardware watchdog it feeds while the
//! loop runs (a hung host is reset).

use super::{lock, Agent, AgentError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::liveness::FenceReason;
use tandem_core::Millis;

/// The software watchdog's shortest and longest sleep.
pub const WATCHDOG_MIN_SLEEP_MS: u64 = 10;
pub const WATCHDOG_MAX_SLEEP_MS: u64 = 250;

impl Agent {
    /// A software watchdog thread (a stalled runtime still kills its VMs in time) and, when
    /// configured, the hardware watchdog (a hung host is reset).
    pub(super) fn start_watchdogs(self: &Arc<Self>) -> Result<(), AgentError> {
        if !self.os_threads {
            return Ok(());
        }
        let w = &self.cfg.watchdog;
        if w.enabled {
            let dog = crate::watchdog::HardwareWatchdog::open(&w.device, w.timeout_s, self.cfg.watchdog_max_timeout_s(), w.test_file)?;
            *lock(&self.hw_watchdog) = Some(dog);
        }
        let a = Arc::clone(self);
        let limit = self.cfg.timings.self_fence_ms;
        let kill_grace = self.cfg.timings.kill_grace_ms;
        let dog_ms = w.timeout_s.saturating_mul(1000);
        std::thread::Builder::new()
            .name("tandem-watchdog".into())
            .spawn(move || {
                let mut tripped = false;
                // It wakes at the lease's end (to the 10 ms), and at least every `max_sleep`
                // — half the kill grace, a quarter of the hardware timeout — to notice a stall
                // and feed the hardware watchdog: a few wakeups a second, not twenty.
                let max_sleep = (kill_grace / 2).min(if dog_ms > 0 { dog_ms / 4 } else { u64::MAX }).clamp(WATCHDOG_MIN_SLEEP_MS, WATCHDOG_MAX_SLEEP_MS);
                let mut wait = WATCHDOG_MIN_SLEEP_MS;
                while !a.stopping.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(wait));
                    let now = a.clock.now();
                    let last = a.last_tick.load(Ordering::SeqCst);
                    let lease_until = a.lease_until.load(Ordering::SeqCst);
                    // The loop that proves we are alive has not run, or the lease it last
                    // computed has ended without a renewal: peers count their fence deadline
                    // from our last evidence of life, so every VM must be dead by the lease's
                    // end plus the kill grace, whatever state the loops are in.
                    let stalled = last > 0 && now.since(Millis(last)) > limit;
                    let lease_over = lease_until > 0 && now.0 >= lease_until;
                    if (stalled || lease_over) && !tripped {
                        tripped = true;
                        // Fence (kill, and rejoin before anything runs again) rather than only
                        // kill, so a reconcile pass that was scheduled before the pause cannot
                        // start the VMs again from stale state.
                        let silent_ms = now.since(Millis(last));
                        if a.is_fenced() {
                            a.driver.kill_all();
                        } else {
                            a.fence(FenceReason::Isolated { silent_ms }, now);
                        }
                        tracing::error!(silent_ms, lease_over, "liveness loop stalled or lease ended: fenced, every VM killed");
                    }
                    if !stalled && !lease_over {
                        tripped = false;
                    }
                    // The hardware watchdog is fed while the loop runs and a reset `timeout_s`
                    // from now would still come before the lease's end plus the kill grace — or
                    // while nothing runs here to protect. A host that hangs is then reset no
                    // later than a running one would have killed its VMs.
                    let lease_ahead = lease_until == 0 || now.0 + dog_ms < lease_until + kill_grace;
                    if !stalled && (lease_ahead || a.runs_nothing()) {
                        if let Some(dog) = lock(&a.hw_watchdog).as_mut() {
                            dog.feed();
                        }
                    }
                    wait = if lease_until > now.0 { (lease_until - now.0).clamp(WATCHDOG_MIN_SLEEP_MS, max_sleep) } else { max_sleep };
                }
            })
            .map_err(AgentError::Launcher)?;
        Ok(())
    }

    /// Whether no workload of this host is alive.
    fn runs_nothing(&self) -> bool {
        self.driver.list().iter().all(|v| v.exit.is_some())
    }
}
