//! The heartbeat disk: slot reads, slot writes and when one counts as a renewal, whether the
//! disk is the cluster's shared one.

use super::Liveness;
use crate::hostset::HostId;
use crate::time::Millis;
use crate::wire::SlotRead;

/// Slot writes kept waiting for a read to show them on the shared disk; older ones are dropped
/// (a later write confirmed renews at least as far).
pub(super) const PENDING_DISK_WRITES: usize = 16;

impl Liveness {
    /// Takes the result of reading every slot at `now` (index = host id), a read that began at
    /// `now` too (see [`Liveness::disk_read_between`]).
    pub fn disk_read(&mut self, slots: &[SlotRead], now: Millis) {
        self.disk_read_between(slots, now, now);
    }

    /// Takes the result of a read of every slot that began at `started` and ended at `now`.
    pub fn disk_read_between(&mut self, slots: &[SlotRead], started: Millis, now: Millis) {
        self.last_disk_read_ok = Some(now);
        // Every slot change this read shows was written after the previous read began.
        let previous_read = self.last_disk_read_started;
        self.last_disk_read_started = Some(self.last_disk_read_started.map_or(started, |s| s.max(started)));
        for (i, read) in slots.iter().enumerate() {
            let h = HostId(i as u32);
            if h == self.me {
                if let SlotRead::Valid(s) = read {
                    let mine = (s.incarnation, s.counter);
                    if s.incarnation == self.incarnation && self.own_slot.is_some_and(|old| old != mine) {
                        self.own_slot_advanced_at = Some(now);
                        self.own_advanced_read = Some(started);
                    }
                    self.own_slot = Some(mine);
                }
                continue;
            }
            let Some(p) = self.peers.get_mut(&h) else { continue };
            match read {
                SlotRead::Empty => {}
                SlotRead::Corrupt(c) => {
                    if p.slot_corrupt.is_none() {
                        self.counters.corrupt_slots += 1;
                    }
                    p.slot_corrupt = Some(*c);
                }
                SlotRead::Valid(s) => {
                    p.slot_corrupt = None;
                    // The slot names the peer's current incarnation: heartbeats of an older one
                    // (recorded and replayed, perhaps to a receiver that just restarted and
                    // remembers nothing) are refused from now on.
                    if s.incarnation > p.incarnation {
                        p.incarnation = s.incarnation;
                        p.seq = 0;
                        p.received = 0;
                    }
                    let changed = p.slot.is_none_or(|old| (old.incarnation, old.counter) != (s.incarnation, s.counter));
                    if changed {
                        // Only a change seen between two reads shows the writer alive here: a
                        // slot seen once may be a stale copy (a private file, an old image).
                        if p.slot.is_some() {
                            p.slot_changed_at = Some(now);
                            p.slot_changed_after = previous_read;
                        }
                        p.disk_seen += 1;
                        if let Some(old) = p.slot.filter(|old| old.incarnation == s.incarnation && s.counter > old.counter) {
                            p.disk_missed += s.counter - old.counter - 1;
                        }
                    }
                    p.slot = Some(*s);
                }
            }
        }
        self.confirm_disk_writes(now);
    }

    /// Records a failed or timed-out read of the heartbeat disk.
    pub fn disk_read_failed(&mut self) {
        self.counters.failed_disk_reads += 1;
    }

    /// Records a slot write that began at `started` and completed at `finished`; a write slower
    /// than the disk I/O timeout counts as lost.
    pub fn disk_written(&mut self, started: Millis, finished: Millis) {
        if finished.since(started) <= self.timings.disk_io_timeout_ms {
            if self.pending_disk_writes.len() == PENDING_DISK_WRITES {
                self.pending_disk_writes.pop_front();
            }
            self.pending_disk_writes.push_back(started);
        } else {
            self.counters.late_disk_writes += 1;
        }
    }

    /// Takes as renewals the slot writes that reads have since shown on the shared disk: a read
    /// that began at or after the write saw our own slot advance (the write is on the disk we
    /// read), and the slots of enough peers to make a majority with us changed after the write
    /// began (each change seen by a read whose previous read began after it: those peers write
    /// to that disk since). A renewal is taken when it is confirmed, so a lapse is judged then.
    ///
    /// Why: a disk that only *was* shared — a host's path switched to a stale private copy —
    /// still looks shared for a peer timeout by its old changes, and writes to it renewed the
    /// lease although no peer could ever see them: peers counted the host's fence deadline from
    /// earlier evidence and restarted its VMs while it still ran them (simulator seed 237,
    /// `disk-private-one`, once failovers committed a tick sooner).
    pub(super) fn confirm_disk_writes(&mut self, now: Millis) {
        let Some(own) = self.own_advanced_read else { return };
        let need = self.disk_peers_needed();
        let peers = if need == 0 {
            Some(Millis(u64::MAX))
        } else {
            let mut after: Vec<Millis> = self.peers.values().filter_map(|p| p.slot_changed_after).collect();
            after.sort_unstable_by(|a, b| b.cmp(a));
            after.get(need - 1).copied()
        };
        let Some(peers) = peers else { return };
        let threshold = own.min(peers);
        let confirmed = self.pending_disk_writes.iter().copied().filter(|w| *w <= threshold).max();
        self.pending_disk_writes.retain(|w| *w > threshold);
        if let Some(started) = confirmed {
            self.note_lapse(now);
            self.last_disk_write_ok = Some(self.last_disk_write_ok.map_or(started, |t| t.max(started)));
        }
    }

    /// Records a slot write that failed or never completed.
    pub fn disk_write_failed(&mut self) {
        self.counters.late_disk_writes += 1;
    }

    /// Whether the disk we write and read is demonstrably the cluster's shared disk: within the
    /// last peer timeout we read the slots of a majority of the members (our own read back
    /// included) advance on it. Each host writes one disk and two majorities intersect, so at
    /// most one disk can be shared at a time; a private file, a copy, or a disk we can write but
    /// not read never is. Only a shared disk renews the lease or proves a peer dead.
    #[must_use]
    pub fn disk_shared(&self, now: Millis) -> bool {
        let fresh = |t: Option<Millis>| t.is_some_and(|c| now.since(c) < self.timings.peer_timeout_ms);
        let own = fresh(self.own_slot_advanced_at);
        let advancing = usize::from(own) + self.peers.values().filter(|p| fresh(p.slot_changed_at)).count();
        // The witness's vote comes only with our own slot seen on that disk.
        let votes = advancing + if own { self.disk_votes() } else { 0 };
        votes > (self.members.len() + self.disk_votes()) / 2
    }

    pub(super) fn disk_readable(&self, now: Millis) -> bool {
        self.last_disk_read_ok.is_some_and(|t| now.since(t) <= self.timings.disk_io_timeout_ms + self.timings.heartbeat_interval_ms)
    }
}
