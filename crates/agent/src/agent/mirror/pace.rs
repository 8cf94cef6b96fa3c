//! The pace of a mirror's resync, for the operator: how fast it has copied since it began, and
//! how long it needs at that pace for what is left (`/v1/local`'s links, `tandem vm mirrors`).
//! Display only: no decision reads it.

use crate::views::ResyncPaceView;
use std::time::{Duration, Instant};

/// A pace is told only once the resync has run this long (the first samples say little).
pub const MIN_PACE_WINDOW: Duration = Duration::from_secs(1);

/// A resync's first and latest samples: bytes copied, of how many, when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ResyncPace {
    first: (u64, Instant),
    latest: (u64, u64, Instant),
}

impl ResyncPace {
    pub(super) fn begin(copied: u64, total: u64, at: Instant) -> ResyncPace {
        ResyncPace { first: (copied, at), latest: (copied, total, at) }
    }

    /// A later sample of the same resync.
    pub(super) fn observe(&mut self, copied: u64, total: u64, at: Instant) {
        self.latest = (copied, total, at);
    }

    /// The pace as of the latest sample (not of the moment asked: between two samples the
    /// count stands still while the clock runs); none before [`MIN_PACE_WINDOW`], while
    /// nothing was copied, or after a count that went back.
    pub(super) fn pace(&self) -> Option<ResyncPaceView> {
        let ((first_copied, first_at), (copied, total, at)) = (self.first, self.latest);
        let elapsed = at.checked_duration_since(first_at).filter(|e| *e >= MIN_PACE_WINDOW)?;
        let moved = copied.checked_sub(first_copied).filter(|m| *m > 0)?;
        let per_s = moved as f64 / elapsed.as_secs_f64();
        let left = total.saturating_sub(copied) as f64 / per_s;
        Some(ResyncPaceView { kib_s: (per_s / 1024.0) as u64, left_s: left.ceil() as u64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pace_is_the_average_from_the_first_sample_to_the_latest() {
        let t0 = Instant::now();
        let mut p = ResyncPace::begin(10 << 20, 100 << 20, t0);
        assert_eq!(p.pace(), None, "one sample");
        p.observe(10 << 20, 100 << 20, t0 + Duration::from_secs(5));
        assert_eq!(p.pace(), None, "nothing copied yet");
        p.observe(20 << 20, 100 << 20, t0 + Duration::from_millis(500));
        assert_eq!(p.pace(), None, "too early to tell");
        // 32 MiB in 2 s: 16 MiB/s; 58 MiB left: 4 s (rounded up).
        p.observe(42 << 20, 100 << 20, t0 + Duration::from_secs(2));
        assert_eq!(p.pace(), Some(ResyncPaceView { kib_s: 16 << 10, left_s: 4 }));
        p.observe(100 << 20, 100 << 20, t0 + Duration::from_secs(3));
        assert_eq!(p.pace().map(|p| p.left_s), Some(0), "done");
        p.observe(5 << 20, 100 << 20, t0 + Duration::from_secs(4));
        assert_eq!(p.pace(), None, "a count that went back (a new job) tells nothing");
    }
}
