//! When a live migration does not converge: the escalation schedule, sans I/O.
//!
//! A guest that dirties memory faster than the link copies it never gets its remaining memory
//! under what the downtime limit allows. The driver samples QEMU's progress (`query-migrate`)
//! and feeds each sample here; the answer says what to change. Progress is the smallest
//! remaining amount seen so far: QEMU's `remaining` rises at every new pass over memory, so a
//! single sample says little, but a minimum that has not fallen for a while is a stall. On each
//! stall the schedule takes its next step — a higher downtime limit (Proxmox starts at 100 ms
//! and doubles), then throttling the guest's vCPUs (QEMU's auto-converge) — and after the last
//! step, or past the overall bound, it cancels, with the reason; or, for a VM whose spec opts
//! in ([`Postcopy`]), it switches to post-copy instead (or as soon as the first pass over memory
//! is done), which always ends. Nothing here reads a clock: the caller passes the time of each
//! sample.

use crate::spec::Postcopy;
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
    /// Switch to post-copy: the guest moves to the destination now, its missing pages follow.
    /// The last step: nothing is changed or cancelled after it.
    PostCopy,
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
    postcopy: Postcopy,
    /// Set once the switch to post-copy was asked for.
    switched: bool,
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
        Convergence { started: now, steps, at: 0, best_remaining: None, best_at: now, stall_ms, overall_ms, postcopy: Postcopy::Off, switched: false }
    }

    /// The same schedule for a VM whose spec allows post-copy as `postcopy` says.
    #[must_use]
    pub fn with_postcopy(self, postcopy: Postcopy) -> Convergence {
        Convergence { postcopy, ..self }
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
    pub fn applied(&self) -> Vec<ConvergenceStep> {
        let mut steps = self.steps[..=self.at].to_vec();
        if self.switched {
            steps.push(ConvergenceStep::PostCopy);
        }
        steps
    }

    /// Whether the switch to post-copy was asked for.
    #[must_use]
    pub fn switched(&self) -> bool {
        self.switched
    }

    fn switch(&mut self) -> ConvergenceAction {
        self.switched = true;
        ConvergenceAction::Apply(ConvergenceStep::PostCopy)
    }

    /// One progress sample: `remaining` bytes of memory still to copy at `now`, after `passes`
    /// synchronisations of the dirty log (QEMU's `dirty-sync-count`: 2 once the first pass
    /// over memory is done).
    pub fn observe(&mut self, now: Millis, remaining: u64, passes: u64) -> ConvergenceAction {
        if self.switched {
            return ConvergenceAction::Continue;
        }
        if self.postcopy == Postcopy::AfterFirstPass && passes >= 2 {
            return self.switch();
        }
        let elapsed = now.since(self.started);
        if elapsed >= self.overall_ms {
            if !self.postcopy.is_off() {
                return self.switch();
            }
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
        if !self.postcopy.is_off() {
            return self.switch();
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
            assert_eq!(c.observe(Millis(900 * i as u64), *r << 20, 1), ConvergenceAction::Continue);
        }
        // A new pass raises remaining: not a stall until the window passes.
        assert_eq!(c.observe(Millis(3_000), 650 << 20, 2), ConvergenceAction::Continue);
        let mut seen = vec![];
        let mut t = 3_000;
        loop {
            t += 1_100;
            match c.observe(Millis(t), 650 << 20, 3) {
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
            assert_eq!(c.observe(Millis(t), r, 1), ConvergenceAction::Continue);
        }
        assert!(matches!(c.observe(Millis(10_000), r - 1, 1), ConvergenceAction::Cancel { reason } if reason.contains("bound")));
    }

    /// A VM that opts in switches to post-copy where another would be cancelled — after the
    /// last step stalls, or at the overall bound — and, with `after-first-pass`, as soon as the
    /// first pass over memory is done; after the switch nothing changes any more.
    #[test]
    fn postcopy_replaces_the_cancel_for_a_vm_that_opts_in() {
        let mut c = Convergence::with(Millis(0), 1_000, 600_000).with_postcopy(Postcopy::WhenStalled);
        let mut t = 0;
        let last = loop {
            t += 1_100;
            match c.observe(Millis(t), 650 << 20, 5) {
                ConvergenceAction::Continue => {}
                ConvergenceAction::Apply(ConvergenceStep::PostCopy) => break ConvergenceStep::PostCopy,
                ConvergenceAction::Apply(_) => {}
                ConvergenceAction::Cancel { reason } => panic!("cancelled: {reason}"),
            }
            assert!(t < 60_000, "the schedule must end");
        };
        assert_eq!(last, ConvergenceStep::PostCopy);
        assert!(c.switched());
        assert_eq!(c.applied().last(), Some(&ConvergenceStep::PostCopy));
        assert!(c.applied().contains(&ConvergenceStep::Throttle { max_pct: MAX_THROTTLE_PCT }), "the pre-copy steps came first");
        assert_eq!(c.observe(Millis(700_000), 1 << 40, 9), ConvergenceAction::Continue, "nothing after the switch, not even the bound");

        let mut bound = Convergence::with(Millis(0), 1_000, 10_000).with_postcopy(Postcopy::WhenStalled);
        assert_eq!(bound.observe(Millis(10_000), 1 << 30, 1), ConvergenceAction::Apply(ConvergenceStep::PostCopy));

        let mut first = Convergence::with(Millis(0), 1_000, 600_000).with_postcopy(Postcopy::AfterFirstPass);
        assert_eq!(first.observe(Millis(100), 900 << 20, 1), ConvergenceAction::Continue, "still in the first pass");
        assert_eq!(first.observe(Millis(200), 100 << 20, 2), ConvergenceAction::Apply(ConvergenceStep::PostCopy));
        assert_eq!(first.applied(), vec![ConvergenceStep::DowntimeLimit { ms: 100 }, ConvergenceStep::PostCopy]);

        let mut off = Convergence::with(Millis(0), 1_000, 600_000);
        assert_eq!(off.observe(Millis(100), 900 << 20, 7), ConvergenceAction::Continue, "passes alone never switch a VM that did not opt in");
    }
}
