//! Which liveness ticks are full rounds (slot write, the agent's periodic loops).

use super::Liveness;
use crate::time::Millis;

/// While the cluster is calm, a full round (slot write, periodic loops) every this many ticks
/// (see [`Liveness::round_due`]): their share of an idle agent's CPU, halved.
pub const CALM_ROUND_TICKS: u64 = 2;

impl Liveness {
    /// Whether the tick at `now` is a full round: this host writes its disk slot, and the
    /// agent's periodic loops (membership, coordinator, reconciler, migrations — they also run
    /// at once on every applied entry) make a pass. Network heartbeats go out and the disk is
    /// read at every tick regardless: a peer's slot change is stamped with the time of the read
    /// that saw it, so reading less often would make that evidence later, and fence deadlines
    /// with it. While the cluster is calm — every peer heard on the network within a third of
    /// the peer timeout, our lease not lapsed, no losing verdict — a full round comes every
    /// [`CALM_ROUND_TICKS`] ticks: the network renews the lease and shows every peer alive,
    /// and the slot only has to keep advancing for the disk to count as shared. As soon as any
    /// peer goes quiet (long before it can be declared dead) every tick is a full round again,
    /// so a lease renewed by the disk alone and a partition's verdict are as fresh as before.
    /// Safety does not depend on the cadence: every use of a disk time is bounded by the time
    /// itself, never by a count of rounds.
    #[must_use]
    pub fn round_due(&self, now: Millis) -> bool {
        let i = self.timings.heartbeat_interval_ms;
        // Half an interval of slack: ticks are periodic, not exact.
        let spaced = self.round_begun_at.is_none_or(|t| now.since(t) + i / 2 >= CALM_ROUND_TICKS * i);
        spaced || !self.calm(now)
    }

    /// Records that a full round began at `now`.
    pub fn round_begun(&mut self, now: Millis) {
        self.round_begun_at = Some(now);
    }

    /// Every peer heard on the network within a third of the peer timeout, the lease not
    /// lapsed, no losing verdict (see [`Liveness::round_due`]).
    pub(super) fn calm(&self, now: Millis) -> bool {
        let recent = self.timings.peer_timeout_ms / 3;
        self.lapsed.is_none() && self.losing_since.is_none() && self.peers.values().all(|p| p.last_net.is_some_and(|t| now.since(t) < recent))
    }
}
