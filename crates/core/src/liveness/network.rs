//! Network heartbeats: what is sent, what is taken, the acks and reports they carry.

use super::{HeartbeatCount, HeartbeatRejected, Liveness, PeerState, Report, CALM_COPY_TICKS, SENT_HISTORY};
use crate::hostset::{HostId, HostSet};
use crate::time::Millis;
use crate::wire::{Ack, BroadcastAck, HeardAges, Heartbeat, HeartbeatFormat};

impl Liveness {
    /// Records that our heartbeat `seq` left at `now`.
    pub fn heartbeat_sent(&mut self, seq: u64, now: Millis) {
        if self.sent.len() == SENT_HISTORY {
            self.sent.pop_front();
        }
        self.sent.push_back((seq, now));
    }

    /// Whether every peer heard on the network within the peer timeout has acknowledged one of
    /// our heartbeats numbered `seq` or later: what a host that stops waits for before it goes
    /// quiet, so that the fence it announced from `seq` on was heard by everyone who can hear
    /// it. A silent peer is not waited for (it learns the fence from the slot).
    #[must_use]
    pub fn acknowledged_since(&self, seq: u64, now: Millis) -> bool {
        let heard = |p: &PeerState| p.last_net.is_some_and(|t| now.since(t) < self.timings.peer_timeout_ms);
        self.peers.values().filter(|p| heard(p)).all(|p| p.acked_my_seq.is_some_and(|a| a >= seq))
    }

    /// Counts a datagram that failed authentication.
    pub fn heartbeat_forged(&mut self) {
        self.counters.forged_heartbeats += 1;
    }

    /// Takes an authenticated heartbeat received at `now`.
    pub fn heartbeat_received(&mut self, hb: &Heartbeat, now: Millis) -> Result<(), HeartbeatRejected> {
        self.heartbeat_received_as(hb, HeartbeatFormat::Addressed, now)
    }

    /// [`Liveness::heartbeat_received`] for a heartbeat that came in `format`: the peer is
    /// answered in the same one.
    pub fn heartbeat_received_as(&mut self, hb: &Heartbeat, format: HeartbeatFormat, now: Millis) -> Result<(), HeartbeatRejected> {
        if hb.from == self.me {
            return Err(HeartbeatRejected::FromSelf);
        }
        if hb.to != self.me {
            return Err(HeartbeatRejected::Misaddressed { from: hb.from, to: hb.to });
        }
        let me = self.me;
        if !self.peers.contains_key(&hb.from) {
            return Err(HeartbeatRejected::NotMember(hb.from));
        }
        // Only acks of this incarnation count: a peer that has not yet heard us since our restart
        // still acks the last sequence number of our previous life.
        let ack = hb.ack.filter(|a| a.incarnation == self.incarnation);
        if ack.is_some() {
            // A renewal that arrives after our lease lapsed does not continue it.
            self.note_lapse(now);
        }
        let Some(p) = self.peers.get_mut(&hb.from) else {
            return Err(HeartbeatRejected::NotMember(hb.from));
        };
        let newer = hb.incarnation > p.incarnation || (hb.incarnation == p.incarnation && hb.seq > p.seq);
        if !newer {
            self.counters.replayed_heartbeats += 1;
            return Err(HeartbeatRejected::Replay { from: hb.from, incarnation: hb.incarnation, seq: hb.seq });
        }
        if hb.incarnation == p.incarnation && p.received > 0 {
            // A paced copy follows a sequence number that was never meant for us.
            p.missed += (hb.seq - p.seq - 1).saturating_sub(u64::from(hb.paced));
        }
        p.received += 1;
        p.incarnation = hb.incarnation;
        p.seq = hb.seq;
        if p.last_net.is_none_or(|l| now.since(l) >= self.timings.peer_timeout_ms) {
            p.net_spell_began = Some(now);
        }
        p.last_net = Some(now);
        p.net_fenced = hb.fenced;
        p.net_epoch = hb.epoch;
        p.format = format;
        if let Some(a) = ack {
            p.acked_my_seq = Some(p.acked_my_seq.map_or(a.seq, |old| old.max(a.seq)));
        }
        // What the sender reports hearing of the others: evidence of their life, on our clock.
        // The report it replaces is older news from the same reporter, except across a restart
        // of the reporter (its new life remembers nothing): that one is folded in first.
        let report = Report { at: now, incarnation: hb.incarnation, ages: hb.ages, heard: hb.heard };
        if let Some(old) = p.report.replace(report).filter(|old| old.incarnation != hb.incarnation) {
            old.fold_into(hb.from, me, &mut self.peers);
        }
        Ok(())
    }

    /// Heartbeats received and missed per peer.
    #[must_use]
    pub fn heartbeat_counts(&self) -> Vec<HeartbeatCount> {
        self.peers
            .iter()
            .map(|(h, p)| HeartbeatCount { host: *h, received: p.received, missed: p.missed, disk_seen: p.disk_seen, disk_missed: p.disk_missed })
            .collect()
    }

    /// How long ago we last heard each peer, at `now`: every heartbeat we send carries it.
    #[must_use]
    pub fn ages(&self, now: Millis) -> HeardAges {
        let mut ages = HeardAges::default();
        for (h, p) in &self.peers {
            if let Some(t) = p.last_net {
                ages.set(*h, now.since(t));
            }
        }
        ages
    }

    /// The copy of our heartbeat for `peer`: `common` (built once per round) with the ack of
    /// the last heartbeat we received from it.
    #[must_use]
    pub fn addressed(&self, common: &Heartbeat, peer: HostId) -> Heartbeat {
        let ack = self.peers.get(&peer).filter(|p| p.last_net.is_some()).map(|p| Ack { incarnation: p.incarnation, seq: p.seq });
        Heartbeat { to: peer, ack, ..common.clone() }
    }

    /// The copy of heartbeat `common` for `peer`, if `peer` gets one this tick, recorded as
    /// sent. Every peer gets every heartbeat unless `paced` ([`Liveness::copies_paced`]); then
    /// every peer gets the same ones, every [`CALM_COPY_TICKS`]th, and none misses two in a row
    /// (a first copy, or one after a left-out turn, goes regardless). The same ones: when this
    /// host falls silent, its peers then last heard it at the same moment. Turns by peer (half
    /// the peers at each tick) spread that moment over a pacing period, and the partition
    /// verdict, which compares who still hears whom, put a healthy peer on the losing side for
    /// longer than `partition_confirm_ms` (simulator seeds 54 and 127). A copy that follows a
    /// left-out sequence number says so, so the receiver does not count it as lost. A host
    /// that is not (yet) a member here gets every heartbeat.
    pub fn copy_for(&mut self, common: &Heartbeat, peer: HostId, paced: bool) -> Option<Heartbeat> {
        let seq = common.seq;
        let last = self.peers.get(&peer).and_then(|p| p.last_copy_seq);
        let turn = seq.is_multiple_of(CALM_COPY_TICKS);
        let overdue = last.is_none_or(|l| seq.saturating_sub(l) >= CALM_COPY_TICKS);
        if paced && !turn && !overdue {
            return None;
        }
        let copy = Heartbeat { paced: last.is_some_and(|l| seq.checked_sub(l) == Some(CALM_COPY_TICKS)), ..self.addressed(common, peer) };
        if let Some(p) = self.peers.get_mut(&peer) {
            p.last_copy_seq = Some(seq);
        }
        Some(copy)
    }

    /// The format `peer` sends in (and so reads).
    #[must_use]
    pub fn format_of(&self, peer: HostId) -> HeartbeatFormat {
        self.peers.get(&peer).map_or_else(HeartbeatFormat::default, |p| p.format)
    }

    /// The acks of a broadcast heartbeat (for peers of the previous release): one per peer
    /// heard, with its age.
    #[must_use]
    pub fn broadcast_acks(&self, now: Millis) -> Vec<BroadcastAck> {
        self.peers
            .iter()
            .filter_map(|(h, p)| {
                let age = now.since(p.last_net?).min(u64::from(u16::MAX)) as u16;
                Some(BroadcastAck { host: *h, ack: Ack { incarnation: p.incarnation, seq: p.seq }, age_ms: age })
            })
            .collect()
    }

    /// The hosts we hear on the network now (ourselves included).
    #[must_use]
    pub fn heard(&self, now: Millis) -> HostSet {
        let mut s = HostSet::single(self.me);
        for (h, p) in &self.peers {
            if p.last_net.is_some_and(|t| now.since(t) < self.timings.peer_timeout_ms) {
                s.insert(*h);
            }
        }
        s
    }
}
