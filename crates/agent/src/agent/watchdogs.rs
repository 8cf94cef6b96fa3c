//! The watchdogs: a software thread that fences the host when the liveness loop stalls (a
//! stalled runtime still kills its VMs in time), and the hardware watchdog it feeds while the
//! loop runs (a hung host is reset).

use super::{lock, Agent, AgentError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::liveness::FenceReason;
use tandem_core::Millis;

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
        std::thread::Builder::new()
            .name("tandem-watchdog".into())
            .spawn(move || {
                let mut tripped = false;
                while !a.stopping.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50));
                    let last = a.last_tick.load(Ordering::SeqCst);
                    let stalled = last > 0 && a.clock.now().since(Millis(last)) > limit;
                    if stalled && !tripped {
                        tripped = true;
                        // The loop that proves we are alive has not run: peers may already count
                        // down our fence deadline. Fence now (kill, and rejoin before anything runs
                        // again) rather than only kill, so a reconcile pass that was scheduled
                        // before the pause cannot start the VMs again from stale state.
                        let now = a.clock.now();
                        let silent_ms = now.since(Millis(last));
                        if a.is_fenced() {
                            a.driver.kill_all();
                        } else {
                            a.fence(FenceReason::Isolated { silent_ms }, now);
                        }
                        tracing::error!(silent_ms, "liveness loop stalled past self_fence_ms: fenced, every VM killed");
                    }
                    if !stalled {
                        tripped = false;
                        if let Some(dog) = lock(&a.hw_watchdog).as_mut() {
                            dog.feed();
                        }
                    }
                }
            })
            .map_err(AgentError::Launcher)?;
        Ok(())
    }
}
