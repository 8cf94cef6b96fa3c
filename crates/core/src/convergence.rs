//! When a live migration does not converge: the escalation schedule, sans I/O.
//!
//! A guest that dirties memory faster than the link copies it never gets its remaining memory
//! under what the downtime limit allows. The driver samples QEMU's progress (`query-migrate`)
//! and feeds each sample here; the answer says what to change. Progress is the smallest
//! remaining amount seen so far: QEMU's `remaining` rises at every new pass over memory, so a
//! single sample says little, but a minimum that has not fallen for a while is a stall. On each
//! stall the schedule takes its next step — a higher downtime limit (Proxmox starts at 100 ms
//! and doubles), then throttling the guest's vCPUs (QEMU's auto-converge) — and after the last
//! step, or past the overall bound, it cancels, with the reason. Nothing here reads a clock: the
//! caller passes the time of each sample.

use crate::time::Millis;

/// The downtime limits tried in turn, in milliseconds.
pub const DOWNTIME_STEPS_MS: [u64; 4] = [100, 300, 1_000, 2_000];
/// A migration whose smallest remaining amount has not fallen for this long takes the next step.
pub const STALL_MS: u64 = 5_000;
/// The bound of a whole migration (a guest that never converges is cancelled by then).
pub const OVERALL_MS: u64 = 600_000;
/// How hard throttling may slow a non-converging guest, in percent of its vCPU time.
pub const MAX_THROTTLE_PCT: u8 = 99;

/// One step of the schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvergenceStep {
    /// The longest pause QEMU may plan for the switchover.
    DowntimeLimit { ms: u64 },
    /// Let QEMU throttle the guest's vCPUs, up to `max_pct`.
    Throttle { max_pct: u8 },
}

/// What the driver does after a sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConvergenceAction {
    /// Nothing to change.
    Continue,
    /// Apply this step.
    Apply(ConvergenceStep),
    /// Cancel the migration; the VM keeps running at the source.
    Cancel { reason: String },
}

/// The schedule's state for one migration.
#[derive(Clone, Debug)]
pub struct Convergence {
    started: Millis,
    steps: Vec<ConvergenceStep>,
    /// The step in force (index into `steps`).
    at: usize,
    best_remaining: Option<u64>,
    best_at: Millis,
    stall_ms: u64,
    overall_ms: u64,
}

impl Convergence {
    /// The default schedule, started at `now`: the first step is the one to apply at once.
    #[must_use]
    pub fn new(now: Millis) -> Convergence {
        Convergence::with(now, STALL_MS, OVERALL_MS)
    }

    /// A schedule with other bounds (tests, benchmarks).
    #[must_use]
    pub fn with(now: Millis, stall_ms: u64, overall_ms: u64) -> Convergence {
        let mut steps: Vec<ConvergenceStep> = DOWNTIME_STEPS_MS.iter().map(|ms| ConvergenceStep::DowntimeLimit { ms: *ms }).collect();
        steps.push(ConvergenceStep::Throttle { max_pct: MAX_THROTTLE_PCT });
        Convergence { started: now, steps, at: 0, best_remaining: None, best_at: now, stall_ms, overall_ms }
    }

    /// The step to apply before the migration starts.
    #[must_use]
    pub fn first(&self) -> ConvergenceStep {
        self.steps[0]
    }

    /// The downtime limit the migration starts with, ms (the first step's).
    #[must_use]
    pub fn initial_downtime_ms(&self) -> u64 {
        DOWNTIME_STEPS_MS[0]
    }

    /// Every step applied so far, for the report.
    #[must_use]
    pub fn applied(&self) -> &[ConvergenceStep] {
        &self.steps[..=self.at]
    }

    /// One progress sample: `remaining` bytes of memory still to copy at `now`.
    pub fn observe(&mut self, now: Millis, remaining: u64) -> ConvergenceAction {
        let elapsed = now.since(self.started);
        if elapsed >= self.overall_ms {
            return ConvergenceAction::Cancel { reason: format!("not complete after {} s (the bound), {} MiB still to copy", elapsed / 1000, remaining >> 20) };
        }
        if self.best_remaining.is_none_or(|b| remaining < b) {
            self.best_remaining = Some(remaining);
            self.best_at = now;
            return ConvergenceAction::Continue;
        }
        if now.since(self.best_at) < self.stall_ms {
            return ConvergenceAction::Continue;
        }
        // Stalled: the next step, with a fresh stall window.
        self.best_at = now;
        self.best_remaining = Some(remaining);
        if self.at + 1 < self.steps.len() {
            self.at += 1;
            return ConvergenceAction::Apply(self.steps[self.at]);
        }
        ConvergenceAction::Cancel {
            reason: format!(
                "did not converge: {} MiB still to copy after {} s, with the highest downtime limit and the guest throttled up to {MAX_THROTTLE_PCT} %",
                remaining >> 20,
                elapsed / 1000
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_keeps_the_step_and_stalls_escalate_then_cancel() {
        let mut c = Convergence::with(Millis(0), 1_000, 60_000);
        assert_eq!(c.first(), ConvergenceStep::DowntimeLimit { ms: 100 });
        // Falling remaining: nothing to change, however long it takes.
        for (i, r) in [900u64, 800, 700, 600].iter().enumerate() {
            assert_eq!(c.observe(Millis(900 * i as u64), *r << 20), ConvergenceAction::Continue);
        }
        // A new pass raises remaining: not a stall until the window passes.
        assert_eq!(c.observe(Millis(3_000), 650 << 20), ConvergenceAction::Continue);
        let mut seen = vec![];
        let mut t = 3_000;
        loop {
            t += 1_100;
            match c.observe(Millis(t), 650 << 20) {
                ConvergenceAction::Continue => {}
                ConvergenceAction::Apply(step) => seen.push(step),
                ConvergenceAction::Cancel { reason } => {
                    assert!(reason.contains("did not converge") && reason.contains("650 MiB"), "{reason}");
                    break;
                }
            }
            assert!(t < 60_000, "the schedule must end");
        }
        assert_eq!(
            seen,
            vec![
                ConvergenceStep::DowntimeLimit { ms: 300 },
                ConvergenceStep::DowntimeLimit { ms: 1_000 },
                ConvergenceStep::DowntimeLimit { ms: 2_000 },
                ConvergenceStep::Throttle { max_pct: 99 }
            ]
        );
        assert_eq!(c.applied().len(), 5);
    }

    #[test]
    fn the_overall_bound_cancels_even_a_migration_that_progresses() {
        let mut c = Convergence::with(Millis(0), 1_000, 10_000);
        let mut r = 1u64 << 40;
        for t in (0..10_000).step_by(500) {
            r -= 1 << 20;
            assert_eq!(c.observe(Millis(t), r), ConvergenceAction::Continue);
        }
        assert!(matches!(c.observe(Millis(10_000), r - 1), ConvergenceAction::Cancel { reason } if reason.contains("bound")));
    }
}
