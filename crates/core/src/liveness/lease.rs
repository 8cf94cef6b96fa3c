//! This host's own lease: its last proof of life, when the lease ends, and lapses.

use super::Liveness;
use crate::hostset::MAX_HOSTS;
use crate::time::Millis;

impl Liveness {
    /// The last moment we know the others could see us: a heartbeat a majority acknowledged, a
    /// slot write that landed in time on a disk shown to be shared (see
    /// [`Liveness::disk_shared`]), or our own start.
    pub(super) fn last_proof_of_life(&self, now: Millis) -> Option<Millis> {
        let disk = self.last_disk_write_ok.filter(|_| self.disk_shared(now));
        [self.majority_acked_at(), disk, Some(self.started)].into_iter().flatten().max()
    }

    /// Whether this host may start a VM at `now`: its proof of life is younger than
    /// `self_fence_ms` and it is not on a losing side. Peers fail a host over only after it has
    /// been silent for longer than that (plus the kill grace and clock margin), so a start gated
    /// on this lease can never overlap the VM's restart elsewhere — even right after a long pause,
    /// when the liveness loop has not yet run to notice it.
    #[must_use]
    pub fn lease_valid(&self, now: Millis) -> bool {
        let alone = self.members.len() == 1;
        let fresh = alone || self.last_proof_of_life(now).is_some_and(|l| now.since(l) < self.timings.self_fence_ms);
        fresh && self.losing_since.is_none() && self.lapsed.is_none()
    }

    /// When our lease ends if nothing renews it: the last proof of life plus `self_fence_ms`.
    /// `None` for a lone host (it needs no lease). The watchdogs act on it: the software one
    /// kills every VM once it passes, the hardware one is fed only while it is far enough ahead.
    #[must_use]
    pub fn lease_until(&self, now: Millis) -> Option<Millis> {
        if self.members.len() == 1 {
            return None;
        }
        let until = self.last_proof_of_life(now).map_or(now, |l| l.plus(self.timings.self_fence_ms));
        // A losing partition verdict is the liveness loop's to act on, once confirmed; the
        // watchdogs only guard the lease.
        Some(if self.lapsed.is_some() { now.min(until) } else { until })
    }

    /// Records, before a renewal is taken at `now`, whether the lease had already lapsed: a
    /// lapsed lease is not continued by a late renewal (peers count from the evidence before).
    pub(super) fn note_lapse(&mut self, now: Millis) {
        if self.members.len() == 1 || self.lapsed.is_some() || self.unlapsed_until.is_some_and(|u| now < u) {
            return;
        }
        match self.last_proof_of_life(now).map(|l| now.since(l)).filter(|s| *s >= self.timings.self_fence_ms) {
            Some(silent) => self.lapsed = Some(silent),
            None => self.unlapsed_until = self.network_lease_end(),
        }
    }

    /// Until when the network alone keeps the lease: a heartbeat a majority acknowledged (or
    /// our start) plus `self_fence_ms`. Renewals only move it later until the membership
    /// changes (which forgets it), so a renewal taken before it needs no check — every
    /// heartbeat of a poll costs no walk over every peer's acks. Disk renewals are left out:
    /// the disk's share can end with time alone (it stops being shown to be shared).
    fn network_lease_end(&self) -> Option<Millis> {
        [self.majority_acked_at(), Some(self.started)].into_iter().flatten().max().map(|l| l.plus(self.timings.self_fence_ms))
    }

    /// The latest instant at which a majority of members (us included) had received a heartbeat
    /// we sent: the send time of the acknowledged heartbeat, so network delay cannot stretch it.
    pub(super) fn majority_acked_at(&self) -> Option<Millis> {
        let majority = self.members.len() / 2 + 1;
        let need_from_peers = majority.saturating_sub(1);
        if need_from_peers == 0 {
            return None;
        }
        // It runs for every heartbeat received (a renewal checks for a lapse first), so it
        // allocates nothing: the send times sit in an array, and the k-th latest is selected.
        let mut times = [Millis(0); MAX_HOSTS];
        let mut n = 0;
        for seq in self.peers.values().filter_map(|p| p.acked_my_seq) {
            if let (Some(t), Some(slot)) = (self.sent_at(seq), times.get_mut(n)) {
                *slot = t;
                n += 1;
            }
        }
        if n < need_from_peers {
            return None;
        }
        let times = &mut times[..n];
        let (_, kth, _) = times.select_nth_unstable_by(need_from_peers - 1, |a, b| b.cmp(a));
        Some(*kth)
    }

    /// When our heartbeat `seq` left, if it is still in the history. Sequence numbers are sent
    /// one after another, so the entry is found by its offset from the oldest one (a search is
    /// the fallback should they ever not be).
    pub(super) fn sent_at(&self, seq: u64) -> Option<Millis> {
        let (first, _) = *self.sent.front()?;
        let guess = usize::try_from(seq.checked_sub(first)?).ok().and_then(|i| self.sent.get(i)).filter(|(s, _)| *s == seq);
        guess.or_else(|| self.sent.iter().find(|(s, _)| *s == seq)).map(|(_, t)| *t)
    }
}
