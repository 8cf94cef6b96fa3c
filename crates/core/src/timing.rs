//! HA timings and the rules that make a set of them safe.
//!
//! The fence deadline for a peer is derived from these numbers, so a configuration that would let
//! a survivor restart a VM before its old host has certainly killed it is refused at start.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Every timing that the HA decisions depend on, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timings {
    /// How often a host sends its network heartbeat and reads the heartbeat disk; it writes its
    /// slot as often, or every fifth of the peer timeout while every peer is heard (`Liveness::round_due`).
    pub heartbeat_interval_ms: u64,
    /// A peer silent on a channel for this long is silent on that channel.
    pub peer_timeout_ms: u64,
    /// A host that has had neither a majority acknowledging it nor a good slot write for this long
    /// fences itself.
    pub self_fence_ms: u64,
    /// A heartbeat-disk read or write that takes longer counts as failed.
    pub disk_io_timeout_ms: u64,
    /// Time allowed for a kill of every VM to take effect once a host decides to fence.
    pub kill_grace_ms: u64,
    /// Added to every fence deadline for clock-rate differences and scheduling delay.
    pub clock_margin_ms: u64,
    /// A losing partition verdict must hold this long before the host fences on it.
    pub partition_confirm_ms: u64,
}

/// The default timings (a `const`, so their relations are checked at compile time in
/// [`crate::limits`]).
pub const DEFAULT_TIMINGS: Timings = Timings {
    heartbeat_interval_ms: 200,
    peer_timeout_ms: 3000,
    self_fence_ms: 2000,
    disk_io_timeout_ms: 1000,
    kill_grace_ms: 500,
    clock_margin_ms: 500,
    partition_confirm_ms: 600,
};

/// Timings for a good LAN (sub-millisecond latency, little loss): heartbeats every 100 ms. A
/// power loss is restarted about 1.7 s after the last evidence of life instead of 3 s; the
/// price is five times the heartbeat traffic of the defaults and less patience with a slow
/// disk (300 ms) or a busy host. Validated like the defaults, watchdog rule included.
pub const LOW_LATENCY_TIMINGS: Timings = Timings {
    heartbeat_interval_ms: 100,
    peer_timeout_ms: 1000,
    self_fence_ms: 1000,
    disk_io_timeout_ms: 300,
    kill_grace_ms: 500,
    clock_margin_ms: 200,
    partition_confirm_ms: 300,
};

impl Default for Timings {
    fn default() -> Self {
        DEFAULT_TIMINGS
    }
}

/// Why a timing configuration is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TimingError {
    #[error("heartbeat_interval_ms = {0} is below the 20 ms floor")]
    IntervalTooShort(u64),
    #[error("peer_timeout_ms = {timeout} must be at least 10 heartbeat intervals ({min} ms), or random heartbeat loss declares healthy peers silent")]
    PeerTimeoutTooShort { timeout: u64, min: u64 },
    #[error("self_fence_ms = {fence} must be at least 5 heartbeat intervals ({min} ms)")]
    SelfFenceTooShort { fence: u64, min: u64 },
    #[error("disk_io_timeout_ms = {io} must lie between one heartbeat interval ({interval} ms) and half of self_fence_ms ({half} ms)")]
    DiskIoTimeout { io: u64, interval: u64, half: u64 },
    #[error("kill_grace_ms = {0} is below the 100 ms floor: a kill needs time to take effect")]
    KillGraceTooShort(u64),
    #[error("clock_margin_ms = {0} is below the 100 ms floor")]
    ClockMarginTooShort(u64),
    #[error("partition_confirm_ms = {confirm} must be below peer_timeout_ms = {timeout}")]
    PartitionConfirm { confirm: u64, timeout: u64 },
}

impl Timings {
    /// Checks the rules that keep fencing safe and false fencing rare.
    pub fn validate(&self) -> Result<(), TimingError> {
        let i = self.heartbeat_interval_ms;
        if i < 20 {
            return Err(TimingError::IntervalTooShort(i));
        }
        if self.peer_timeout_ms < 10 * i {
            return Err(TimingError::PeerTimeoutTooShort { timeout: self.peer_timeout_ms, min: 10 * i });
        }
        if self.self_fence_ms < 5 * i {
            return Err(TimingError::SelfFenceTooShort { fence: self.self_fence_ms, min: 5 * i });
        }
        let half = self.self_fence_ms / 2;
        if self.disk_io_timeout_ms < i || self.disk_io_timeout_ms > half {
            return Err(TimingError::DiskIoTimeout { io: self.disk_io_timeout_ms, interval: i, half });
        }
        if self.kill_grace_ms < 100 {
            return Err(TimingError::KillGraceTooShort(self.kill_grace_ms));
        }
        if self.clock_margin_ms < 100 {
            return Err(TimingError::ClockMarginTooShort(self.clock_margin_ms));
        }
        if self.partition_confirm_ms >= self.peer_timeout_ms {
            return Err(TimingError::PartitionConfirm { confirm: self.partition_confirm_ms, timeout: self.peer_timeout_ms });
        }
        Ok(())
    }

    /// How long after a peer is declared dead its VMs may be restarted elsewhere: by then the
    /// peer, if it still runs at all, has passed its own self-fence point and killed its VMs.
    #[must_use]
    pub const fn fence_wait_ms(&self) -> u64 {
        self.self_fence_ms + self.kill_grace_ms + self.clock_margin_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_safe() {
        assert_eq!(Timings::default().validate(), Ok(()));
        assert_eq!(LOW_LATENCY_TIMINGS.validate(), Ok(()));
    }

    #[test]
    fn unsafe_timings_are_refused() {
        let d = Timings::default();
        let bad = [
            Timings { heartbeat_interval_ms: 5, ..d },
            Timings { peer_timeout_ms: 1000, ..d },
            Timings { self_fence_ms: 500, ..d },
            Timings { disk_io_timeout_ms: 1500, ..d },
            Timings { disk_io_timeout_ms: 10, ..d },
            Timings { kill_grace_ms: 0, ..d },
            Timings { clock_margin_ms: 0, ..d },
            Timings { partition_confirm_ms: 3000, ..d },
        ];
        for t in bad {
            let err = t.validate().expect_err("unsafe timing accepted");
            assert!(!err.to_string().is_empty());
        }
    }
}
