//! What one host knows about every other host, and when it must fence itself.
//!
//! [`Liveness`] is fed every heartbeat received, every heartbeat sent, every disk read and write
//! outcome, each with the time it happened; [`Liveness::assess`] turns that into a classification
//! of each peer, the partition verdict, fence deadlines and the self-fence decision.

use crate::hostset::{HostId, HostSet, MAX_HOSTS};
use crate::partition::{self, Survival};
use crate::time::Millis;
use crate::timing::Timings;
use crate::wire::{Ack, BroadcastAck, DiskSlot, HeardAges, Heartbeat, HeartbeatFormat, SlotCorruption, SlotRead};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use thiserror::Error;

/// How many of our own recent heartbeat send times are remembered to interpret acks.
const SENT_HISTORY: usize = 512;

/// Slot writes kept waiting for a read to show them on the shared disk; older ones are dropped
/// (a later write confirmed renews at least as far).
const PENDING_DISK_WRITES: usize = 16;

/// While the cluster is calm, a full round (slot write, periodic loops) every this many ticks
/// (see [`Liveness::round_due`]): their share of an idle agent's CPU, halved.
pub const CALM_ROUND_TICKS: u64 = 2;

/// A peer as seen from this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostLiveness {
    /// Heard on the network recently.
    Alive,
    /// Silent on our network but alive on the heartbeat disk, or still heard by another host.
    Partitioned,
    /// Silent on the network and on the shared disk (a disk on which a majority is seen
    /// advancing), and heard by nobody.
    Dead,
    /// Silent on the network while we cannot read the disk, or read one that is not shown to be
    /// shared: nothing can be concluded.
    Unknown,
}

/// Why this host must fence itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum FenceReason {
    /// Neither a majority acknowledged us nor did a slot write succeed for `self_fence_ms`.
    Isolated { silent_ms: u64 },
    /// The partition verdict puts us outside the winning side.
    LosingSide { winner: HostSet },
    /// Consensus stopped on this host (an entry it cannot apply, a storage failure): it can no
    /// longer follow committed state, so it must not run anything on what it last knew.
    ConsensusStopped,
    /// The agent was asked to stop: it gives its VMs up before its loops end.
    Stopping,
}

impl std::fmt::Display for FenceReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FenceReason::Isolated { silent_ms } => {
                write!(f, "no majority acknowledged us and no slot write succeeded for {silent_ms} ms")
            }
            FenceReason::LosingSide { winner } => write!(f, "network partition: side {winner} survives without us"),
            FenceReason::ConsensusStopped => write!(f, "consensus stopped on this host; it can no longer follow committed state"),
            FenceReason::Stopping => write!(f, "the agent was asked to stop"),
        }
    }
}

/// Why a heartbeat was not taken.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeartbeatRejected {
    #[error("replayed or reordered heartbeat from {from}: incarnation {incarnation} seq {seq} is not newer")]
    Replay { from: HostId, incarnation: u64, seq: u64 },
    #[error("heartbeat from {0}, which is not a cluster member")]
    NotMember(HostId),
    #[error("heartbeat claims to come from this host")]
    FromSelf,
    #[error("heartbeat from {from} is addressed to {to}, not to this host")]
    Misaddressed { from: HostId, to: HostId },
}

#[derive(Clone, Debug, Default)]
struct PeerState {
    incarnation: u64,
    seq: u64,
    last_net: Option<Millis>,
    net_fenced: bool,
    net_epoch: u64,
    slot: Option<DiskSlot>,
    slot_changed_at: Option<Millis>,
    /// When the read before the one that saw the slot's last change began: the peer wrote that
    /// change after this instant (it was not there yet).
    slot_changed_after: Option<Millis>,
    slot_corrupt: Option<SlotCorruption>,
    acked_my_seq: Option<u64>,
    /// The latest moment other hosts report having heard this peer, on our clock: the receive
    /// time of their heartbeat less the age it states (an upper bound of when they heard it).
    /// Folded in from the reports at every assessment.
    reported_at: Option<Millis>,
    /// What this peer's latest heartbeat reported hearing of the others, and when it arrived:
    /// kept as it came and folded into the others' `reported_at` at the next assessment, so a
    /// heartbeat costs a copy rather than a walk over every peer.
    report: Option<Report>,
    /// The format this peer sends, and so the one it reads.
    format: HeartbeatFormat,
    dead_since: Option<Millis>,
    /// Heartbeats accepted from this peer, and the sequence numbers skipped between them
    /// (within one incarnation): the network channel's loss, for metrics.
    received: u64,
    missed: u64,
    /// Slot updates seen on the heartbeat disk, and counter values skipped between two reads.
    disk_seen: u64,
    disk_missed: u64,
}

/// A peer's report of how long ago it heard each host, received at `at` on our clock.
#[derive(Clone, Copy, Debug)]
struct Report {
    at: Millis,
    /// The reporter's incarnation: a later one starts its memory afresh.
    incarnation: u64,
    ages: HeardAges,
}

impl Report {
    /// When the reporter last heard each host it names (other than `me` and itself), at the
    /// latest: `at - age` is no earlier than the truth (it heard the host `age` before sending,
    /// and sent before we received), so it can only make a deadline later.
    fn evidence(&self, reporter: HostId, me: HostId) -> impl Iterator<Item = (HostId, Millis)> + '_ {
        self.ages.iter().filter(move |(q, _)| *q != me && *q != reporter).map(|(q, age)| (q, Millis(self.at.0.saturating_sub(u64::from(age)))))
    }

    /// Raises `reported_at` of each host this report names.
    fn fold_into(&self, reporter: HostId, me: HostId, peers: &mut BTreeMap<HostId, PeerState>) {
        for (q, at) in self.evidence(reporter, me) {
            if let Some(p) = peers.get_mut(&q) {
                p.reported_at = Some(p.reported_at.map_or(at, |old| old.max(at)));
            }
        }
    }
}

/// Network heartbeats from one peer since this agent started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct HeartbeatCount {
    pub host: HostId,
    pub received: u64,
    /// Sequence numbers that never arrived (or arrived too late and were refused).
    pub missed: u64,
    /// Changes of the peer's disk slot this host saw.
    pub disk_seen: u64,
    /// Slot counter values written by the peer that this host never read.
    pub disk_missed: u64,
}

/// Counters of rejected input, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct RejectCounters {
    pub forged_heartbeats: u64,
    pub replayed_heartbeats: u64,
    pub corrupt_slots: u64,
    pub late_disk_writes: u64,
    pub failed_disk_reads: u64,
}

/// One peer's assessment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PeerAssessment {
    pub host: HostId,
    pub liveness: HostLiveness,
    /// Milliseconds since the last network heartbeat, if any was ever received.
    pub net_age_ms: Option<u64>,
    /// Milliseconds since the peer's slot last changed, if it was ever seen.
    pub disk_age_ms: Option<u64>,
    /// The peer declared itself fenced through this epoch (slot or heartbeat): it runs no VM in
    /// this epoch or any earlier one again.
    pub fenced_epoch: Option<u64>,
    /// When the peer was first seen dead in its current dead spell.
    pub dead_since: Option<Millis>,
    /// The latest evidence of life of the peer this host can vouch for (its own receipts and
    /// slot reads, and what the other hosts report), on this host's clock.
    pub last_evidence: Option<Millis>,
    /// When the peer has certainly killed its VMs if it still runs: only set for dead peers.
    pub fence_deadline: Option<Millis>,
    pub slot_corrupt: bool,
}

/// The whole picture at one instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Assessment {
    pub now: Millis,
    pub heard: HostSet,
    pub disk_alive: HostSet,
    pub disk_readable: bool,
    pub peers: Vec<PeerAssessment>,
    pub fence: Option<FenceReason>,
    /// Whether a majority of members acknowledged us within the peer timeout.
    pub has_majority: bool,
}

impl Assessment {
    /// The assessment of `host`, if it is a peer.
    #[must_use]
    pub fn peer(&self, host: HostId) -> Option<&PeerAssessment> {
        self.peers.iter().find(|p| p.host == host)
    }

    /// Whether a dead peer's fence deadline — the one its last evidence gives once settled
    /// (`last_evidence + fence_wait_ms`; until then the assessment shows a later fallback) — lies
    /// between `before_ms` ahead of `now` and `after_ms` behind it. The agent then ticks at every
    /// poll rather than every interval: the disk read that settles the deadline (it must begin
    /// after it) and the assessment that sees it come one poll apart instead of one interval,
    /// which is most of the time between a deadline and its failover's commit. A few more
    /// heartbeats and slot writes for a second or two; nothing else changes.
    #[must_use]
    pub fn fence_deadline_near(&self, now: Millis, fence_wait_ms: u64, before_ms: u64, after_ms: u64) -> bool {
        self.peers
            .iter()
            .filter(|p| p.liveness == HostLiveness::Dead)
            .filter_map(|p| p.last_evidence.map(|e| e.plus(fence_wait_ms)).or(p.fence_deadline))
            .any(|d| now.0 + before_ms >= d.0 && now.0 <= d.0 + after_ms)
    }
}

/// This host's view of the cluster's liveness.
#[derive(Clone, Debug)]
pub struct Liveness {
    me: HostId,
    /// Our own incarnation: acks of any other do not acknowledge our heartbeats.
    incarnation: u64,
    timings: Timings,
    members: HostSet,
    peers: BTreeMap<HostId, PeerState>,
    sent: VecDeque<(u64, Millis)>,
    started: Millis,
    last_disk_read_ok: Option<Millis>,
    /// When the last successful read of the disk began: writes that completed before then are in it.
    last_disk_read_started: Option<Millis>,
    last_disk_write_ok: Option<Millis>,
    /// Slot writes that landed in time but are not renewals yet (their starts): a read must
    /// first show them on the shared disk (see [`Liveness::confirm_disk_writes`]).
    pending_disk_writes: VecDeque<Millis>,
    /// When the read that last saw our own slot advance began.
    own_advanced_read: Option<Millis>,
    /// Set when a renewal arrived after our lease had already lapsed (the renewal is not taken
    /// as a continuation: peers may count their deadline from before it). The next assessment
    /// fences, whatever the renewal says. Holds the silence at that moment.
    lapsed: Option<u64>,
    /// The instant the lease was last found not lapsed. Until the clock moves on, renewals can
    /// only make it later, so the heartbeats of one poll (stamped alike) check it once, not once
    /// each (a walk over every peer's acks).
    unlapsed_at: Option<Millis>,
    /// Our own slot as last read back from the disk (incarnation, counter), and when a read
    /// last showed it advance: proof that our writes land where we read.
    own_slot: Option<(u64, u64)>,
    own_slot_advanced_at: Option<Millis>,
    losing_since: Option<Millis>,
    /// When the last full round (see [`Liveness::round_due`]) began.
    round_begun_at: Option<Millis>,
    /// When the membership last grew: for `peer_timeout_ms` after it, the slots may still show
    /// a newcomer apart from peers that have not heard it yet, and a losing verdict is set aside.
    grown_at: Option<Millis>,
    counters: RejectCounters,
}

impl Liveness {
    /// A fresh view at `now`. Until evidence arrives, the start instant counts as the last moment
    /// we were connected, so a host that starts isolated fences after `self_fence_ms`.
    #[must_use]
    pub fn new(me: HostId, incarnation: u64, timings: Timings, now: Millis) -> Liveness {
        Liveness {
            me,
            incarnation,
            timings,
            members: HostSet::single(me),
            peers: BTreeMap::new(),
            sent: VecDeque::with_capacity(SENT_HISTORY),
            started: now,
            last_disk_read_ok: None,
            last_disk_read_started: None,
            last_disk_write_ok: None,
            pending_disk_writes: VecDeque::with_capacity(PENDING_DISK_WRITES),
            own_advanced_read: None,
            lapsed: None,
            unlapsed_at: None,
            own_slot: None,
            own_slot_advanced_at: None,
            losing_since: None,
            round_begun_at: None,
            grown_at: None,
            counters: RejectCounters::default(),
        }
    }

    #[must_use]
    pub fn me(&self) -> HostId {
        self.me
    }

    #[must_use]
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    #[must_use]
    pub fn members(&self) -> HostSet {
        self.members
    }

    #[must_use]
    pub fn counters(&self) -> RejectCounters {
        self.counters
    }

    /// Sets the cluster's voting members (from committed state). This host is always included.
    /// [`Liveness::set_members`] at `now`, for a host whose membership may grow while it runs:
    /// a host that had no peers to prove itself to (alone, or never acknowledged by anyone)
    /// counts its silence towards the members it gains from the moment it gains them. Its lease
    /// cannot have been counted on by them before (they had no evidence of it to count from), and
    /// it runs no VM that a peer could restart (a lone host's VMs have no other home; a host that
    /// was never acknowledged never joined). Without it, a host joining a running cluster, or a
    /// single host gaining its first peer, fenced itself at once: its last proof of life was its
    /// start, possibly long ago (issue "Failover in half the time", growing a cluster).
    pub fn set_members_at(&mut self, members: HostSet, now: Millis) {
        let mut m = members;
        m.insert(self.me);
        let grows = m.0 & !self.members.0 != 0;
        if grows && (self.members.len() == 1 || (self.majority_acked_at().is_none() && !self.disk_shared(now))) {
            self.started = self.started.max(now);
        }
        if grows {
            self.grown_at = Some(now);
        }
        self.set_members(members);
    }

    pub fn set_members(&mut self, members: HostSet) {
        let mut m = members;
        m.insert(self.me);
        self.members = m;
        // A majority of other members may have acknowledged less: the lease is checked afresh.
        self.unlapsed_at = None;
        self.peers.retain(|h, _| m.contains(*h));
        for h in m.iter().filter(|h| *h != self.me) {
            self.peers.entry(h).or_default();
        }
    }

    /// Records that our heartbeat `seq` left at `now`.
    pub fn heartbeat_sent(&mut self, seq: u64, now: Millis) {
        if self.sent.len() == SENT_HISTORY {
            self.sent.pop_front();
        }
        self.sent.push_back((seq, now));
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
            p.missed += hb.seq - p.seq - 1;
        }
        p.received += 1;
        p.incarnation = hb.incarnation;
        p.seq = hb.seq;
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
        let report = Report { at: now, incarnation: hb.incarnation, ages: hb.ages };
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
    fn calm(&self, now: Millis) -> bool {
        let recent = self.timings.peer_timeout_ms / 3;
        self.lapsed.is_none() && self.losing_since.is_none() && self.peers.values().all(|p| p.last_net.is_some_and(|t| now.since(t) < recent))
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
    fn confirm_disk_writes(&mut self, now: Millis) {
        let Some(own) = self.own_advanced_read else { return };
        let need = (self.members.len() / 2 + 1).saturating_sub(1);
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

    /// The last moment we know the others could see us: a heartbeat a majority acknowledged, a
    /// slot write that landed in time on a disk shown to be shared (see
    /// [`Liveness::disk_shared`]), or our own start.
    fn last_proof_of_life(&self, now: Millis) -> Option<Millis> {
        let disk = self.last_disk_write_ok.filter(|_| self.disk_shared(now));
        [self.majority_acked_at(), disk, Some(self.started)].into_iter().flatten().max()
    }

    /// Whether the disk we write and read is demonstrably the cluster's shared disk: within the
    /// last peer timeout we read the slots of a majority of the members (our own read back
    /// included) advance on it. Each host writes one disk and two majorities intersect, so at
    /// most one disk can be shared at a time; a private file, a copy, or a disk we can write but
    /// not read never is. Only a shared disk renews the lease or proves a peer dead.
    #[must_use]
    pub fn disk_shared(&self, now: Millis) -> bool {
        let fresh = |t: Option<Millis>| t.is_some_and(|c| now.since(c) < self.timings.peer_timeout_ms);
        let advancing = usize::from(fresh(self.own_slot_advanced_at)) + self.peers.values().filter(|p| fresh(p.slot_changed_at)).count();
        advancing > self.members.len() / 2
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
    fn note_lapse(&mut self, now: Millis) {
        if self.members.len() == 1 || self.lapsed.is_some() || self.unlapsed_at == Some(now) {
            return;
        }
        match self.last_proof_of_life(now).map(|l| now.since(l)).filter(|s| *s >= self.timings.self_fence_ms) {
            Some(silent) => self.lapsed = Some(silent),
            None => self.unlapsed_at = Some(now),
        }
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

    /// The latest instant at which a majority of members (us included) had received a heartbeat
    /// we sent: the send time of the acknowledged heartbeat, so network delay cannot stretch it.
    fn majority_acked_at(&self) -> Option<Millis> {
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
    fn sent_at(&self, seq: u64) -> Option<Millis> {
        let (first, _) = *self.sent.front()?;
        let guess = usize::try_from(seq.checked_sub(first)?).ok().and_then(|i| self.sent.get(i)).filter(|(s, _)| *s == seq);
        guess.or_else(|| self.sent.iter().find(|(s, _)| *s == seq)).map(|(_, t)| *t)
    }

    fn disk_readable(&self, now: Millis) -> bool {
        self.last_disk_read_ok.is_some_and(|t| now.since(t) <= self.timings.disk_io_timeout_ms + self.timings.heartbeat_interval_ms)
    }

    /// Folds every peer's latest report into the others' `reported_at`.
    fn fold_reports(&mut self) {
        let mut reported = [None::<Millis>; MAX_HOSTS];
        for (reporter, p) in &self.peers {
            let Some(r) = p.report else { continue };
            for (q, at) in r.evidence(*reporter, self.me) {
                if let Some(slot) = reported.get_mut(q.0 as usize) {
                    *slot = Some(slot.map_or(at, |old: Millis| old.max(at)));
                }
            }
        }
        for (h, p) in &mut self.peers {
            if let Some(at) = reported.get(h.0 as usize).copied().flatten() {
                p.reported_at = Some(p.reported_at.map_or(at, |old| old.max(at)));
            }
        }
    }

    /// Classifies every peer, decides partition survival and self-fencing, and updates the dead
    /// spells that fence deadlines count from. Call it after feeding the events up to `now`.
    pub fn assess(&mut self, now: Millis) -> Assessment {
        let t = self.timings;
        let heard = self.heard(now);
        let disk_readable = self.disk_readable(now);
        let disk_shared = disk_readable && self.disk_shared(now);
        let slot_fresh = |p: &PeerState| p.slot_changed_at.is_some_and(|c| now.since(c) < t.peer_timeout_ms);
        let net_fresh = |p: &PeerState| p.last_net.is_some_and(|c| now.since(c) < t.peer_timeout_ms);

        let mut disk_alive = HostSet::EMPTY;
        if disk_shared && self.last_disk_write_ok.is_some_and(|w| now.since(w) < t.peer_timeout_ms) {
            disk_alive.insert(self.me);
        }
        let mut reports: BTreeMap<HostId, HostSet> = BTreeMap::new();
        // A fenced host that still writes its slot is alive and connected as far as it reports:
        // it takes part in the partition decision like any other. Leaving it out once let a
        // majority side {fenced h1, h2} count as the lone h2 and lose a tie to a cut-off h0
        // (simulator seed 17).
        for (h, p) in &self.peers {
            if slot_fresh(p) {
                disk_alive.insert(*h);
                if let Some(s) = p.slot {
                    reports.insert(*h, s.heard);
                }
            }
        }
        // Our own report is what we currently hear: the same thing our next slot write carries.
        reports.insert(self.me, heard);

        // Hosts that some other live host still reports hearing are not dead. A heartbeat says
        // how long ago its sender heard each host, so the report ages on our clock (and stops
        // counting a peer timeout after the sender last heard it, as our own hearing does); a
        // slot only says whom its writer heard when it wrote, and counts while it is fresh and
        // newer than the writer's last heartbeat (the newer of the two words wins). Counting
        // the slots' older word as well kept the coordinator calling a dead host "partitioned"
        // for one more disk round after everyone had stopped hearing it.
        self.fold_reports();
        let mut heard_by_others = HostSet::EMPTY;
        for (h, p) in &self.peers {
            if p.reported_at.is_some_and(|r| now.since(r) < t.peer_timeout_ms) {
                heard_by_others.insert(*h);
            }
            let slot_newer = p.slot_changed_at.is_some_and(|c| p.last_net.is_none_or(|n| c > n));
            if slot_fresh(p) && (slot_newer || !net_fresh(p)) {
                if let Some(s) = p.slot {
                    heard_by_others.0 |= s.heard.0;
                }
            }
        }

        // A dead peer's deadline counts from the latest evidence of its life that this host can
        // vouch for, once the renewals that could have followed that evidence would have shown:
        // a majority has acknowledged a heartbeat of ours sent `self_fence_ms` after it (their
        // reports carry what they heard of the peer), and a disk read began after any write
        // that could have renewed it had landed. (ARCHITECTURE.md, "Fence deadlines".)
        let majority_at = self.majority_acked_at();
        let read_started = self.last_disk_read_started;
        let evidence_settled = |e: Millis| {
            majority_at.is_some_and(|m| m >= e.plus(t.self_fence_ms)) && read_started.is_some_and(|r| r >= e.plus(t.self_fence_ms + t.disk_io_timeout_ms))
        };
        let mut peers = Vec::with_capacity(self.peers.len());
        for (h, p) in &mut self.peers {
            let liveness = if net_fresh(p) {
                HostLiveness::Alive
            } else if slot_fresh(p) || heard_by_others.contains(*h) {
                HostLiveness::Partitioned
            } else if disk_shared {
                HostLiveness::Dead
            } else {
                HostLiveness::Unknown
            };
            if liveness == HostLiveness::Dead {
                p.dead_since.get_or_insert(now);
            } else {
                p.dead_since = None;
            }
            // The newer of the two words wins: a slot whose content last changed before the
            // latest heartbeat is older news than that heartbeat, whatever it says.
            let slot_fenced = p.slot.filter(|s| s.fenced).map(|s| s.epoch);
            let net_newer = net_fresh(p) && p.last_net.is_some_and(|n| p.slot_changed_at.is_none_or(|c| n >= c));
            let fenced_epoch = if net_newer { p.net_fenced.then_some(p.net_epoch) } else { slot_fenced };
            let last_evidence = [p.last_net, p.slot_changed_at, p.reported_at].into_iter().flatten().max();
            // Without settled evidence, the deadline counts from the declaration, as a later and
            // so safe bound (the peer was silent everywhere for `peer_timeout_ms` by then).
            let fence_deadline = p.dead_since.map(|d| match last_evidence.filter(|e| evidence_settled(*e)) {
                Some(e) => e.plus(t.fence_wait_ms()),
                None => d.plus(t.fence_wait_ms()),
            });
            peers.push(PeerAssessment {
                host: *h,
                liveness,
                net_age_ms: p.last_net.map(|c| now.since(c)),
                disk_age_ms: p.slot_changed_at.map(|c| now.since(c)),
                fenced_epoch,
                dead_since: p.dead_since,
                last_evidence,
                fence_deadline,
                slot_corrupt: p.slot_corrupt.is_some(),
            });
        }

        let has_majority = match majority_at {
            None => self.members.len() < 2,
            Some(a) => now.since(a) < t.peer_timeout_ms,
        };
        let silent_ms = self.last_proof_of_life(now).map_or(0, |l| now.since(l));
        let alone = self.members.len() == 1;

        let survival = if disk_alive.contains(self.me) { partition::decide(self.members, disk_alive, &reports) } else { Survival::NoPartition };
        // Right after the membership grew, the peers' slots may not list a newcomer yet (they
        // hear it only once they applied its join and its heartbeats reached them): a verdict
        // then is set aside for a peer timeout. Safety does not rest on it: a host without a
        // majority's acknowledgement still loses its lease, and a peer apart from the winner is
        // failed over only once it reports itself fenced (or, dead, after its fence deadline).
        let settling = self.grown_at.is_some_and(|g| now.since(g) < t.peer_timeout_ms);
        let mut fence = None;
        if survival.must_fence(self.me) && !settling {
            let since = *self.losing_since.get_or_insert(now);
            if now.since(since) >= t.partition_confirm_ms {
                if let Survival::Split { winner } = survival {
                    fence = Some(FenceReason::LosingSide { winner });
                }
            }
        } else {
            self.losing_since = None;
        }
        if fence.is_none() && !alone && silent_ms >= t.self_fence_ms {
            fence = Some(FenceReason::Isolated { silent_ms });
        }
        // A lease that lapsed between two assessments fences even if a late renewal came since.
        if let Some(silent_ms) = self.lapsed.take() {
            fence = fence.or(Some(FenceReason::Isolated { silent_ms }));
        }
        Assessment { now, heard, disk_alive, disk_readable, peers, fence, has_majority }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DiskSlot;

    const T: Timings = crate::timing::DEFAULT_TIMINGS;

    fn three(me: u32) -> Liveness {
        let mut l = Liveness::new(HostId(me), 1, T, Millis(0));
        l.set_members([HostId(0), HostId(1), HostId(2)].into_iter().collect());
        l
    }

    fn hb(from: u32, seq: u64, heard: &[u32], ack_me: Option<(u32, u64)>) -> Heartbeat {
        Heartbeat {
            from: HostId(from),
            incarnation: 1,
            seq,
            epoch: 1,
            heard: heard.iter().map(|h| HostId(*h)).collect(),
            fenced: false,
            // Addressed to the host acknowledged, or to host 0 (the receiver in most tests).
            to: HostId(ack_me.map_or(0, |(h, _)| h)),
            ack: ack_me.map(|(_, s)| Ack { incarnation: 1, seq: s }),
            ages: HeardAges::default(),
        }
    }

    /// Ticks at every poll only around a dead peer's fence deadline: from one interval before it
    /// to `after_ms` past it, and never for a peer that is not dead.
    #[test]
    fn a_fence_deadline_is_near_only_around_a_dead_peers_deadline() {
        let peer = |liveness, deadline: Option<u64>, evidence: Option<u64>| PeerAssessment {
            host: HostId(1),
            liveness,
            net_age_ms: None,
            disk_age_ms: None,
            fenced_epoch: None,
            dead_since: None,
            last_evidence: evidence.map(Millis),
            fence_deadline: deadline.map(Millis),
            slot_corrupt: false,
        };
        let at = |peers| Assessment {
            now: Millis(0),
            heard: HostSet::default(),
            disk_alive: HostSet::default(),
            disk_readable: true,
            peers,
            fence: None,
            has_majority: true,
        };
        let dead = at(vec![peer(HostLiveness::Dead, Some(10_000), None)]);
        let near: Vec<u64> = [9_700, 9_800, 10_000, 13_000, 13_001].into_iter().filter(|t| dead.fence_deadline_near(Millis(*t), 3_000, 200, 3_000)).collect();
        assert_eq!(near, vec![9_800, 10_000, 13_000]);
        // Not settled yet: the assessment shows the later fallback; the window is the settled one's.
        let unsettled = at(vec![peer(HostLiveness::Dead, Some(13_000), Some(7_000))]);
        assert!(unsettled.fence_deadline_near(Millis(9_900), 3_000, 200, 3_000));
        let alive = at(vec![peer(HostLiveness::Partitioned, Some(10_000), Some(7_000)), peer(HostLiveness::Dead, None, None)]);
        assert!(!alive.fence_deadline_near(Millis(10_000), 3_000, 200, 3_000));
    }

    /// A calm cluster has a full round (slot write, loops) every second tick; once a peer has been quiet on
    /// the network for a third of the peer timeout, at every tick again.
    #[test]
    fn full_rounds_are_spaced_while_calm_and_every_tick_once_a_peer_is_quiet() {
        let mut l = three(0);
        let i = T.heartbeat_interval_ms;
        let mut due_at = Vec::new();
        for tick in 0..16u64 {
            let now = Millis(tick * i);
            // Host 2 is heard until tick 5, host 1 throughout.
            let heard: &[u32] = if tick <= 5 { &[1, 2] } else { &[1] };
            for peer in heard {
                l.heartbeat_received(&hb(*peer, tick + 1, &[0, 1, 2], None), now).expect("taken");
            }
            if l.round_due(now) {
                l.round_begun(now);
                due_at.push(tick);
            }
        }
        // Host 2's silence reaches 1 s (a third of the peer timeout) at tick 10.
        assert_eq!(due_at, vec![0, 2, 4, 6, 8, 10, 11, 12, 13, 14, 15]);
    }

    /// Disk-channel loss per peer: slot counter values written but never read are counted.
    #[test]
    fn disk_heartbeats_seen_and_missed_are_counted_per_peer() {
        let mut l = three(0);
        for (t, counter) in [(0, 1), (200, 2), (400, 2), (600, 5), (800, 6)] {
            l.disk_read(&[SlotRead::Empty, slot(1, counter, &[0, 1, 2], false), SlotRead::Empty], Millis(t));
        }
        let c = l.heartbeat_counts().into_iter().find(|c| c.host == HostId(1)).expect("peer 1");
        // Changes seen: 1, 2, 5, 6; values 3 and 4 were never read.
        assert_eq!((c.disk_seen, c.disk_missed), (4, 2));
        let quiet = l.heartbeat_counts().into_iter().find(|c| c.host == HostId(2)).expect("peer 2");
        assert_eq!((quiet.disk_seen, quiet.disk_missed), (0, 0));
    }

    fn slot(host: u32, counter: u64, heard: &[u32], fenced: bool) -> SlotRead {
        SlotRead::Valid(DiskSlot {
            host: HostId(host),
            incarnation: 1,
            counter,
            epoch: 1,
            heard: heard.iter().map(|h| HostId(*h)).collect(),
            fenced,
            written_at_ms: 0,
        })
    }

    /// Drives host 0 through `until` ms of healthy traffic from hosts 1 and 2, with `peer_up`
    /// saying whether each peer is still sending and writing at a given instant.
    fn run(l: &mut Liveness, from: u64, until: u64, peer_up: impl Fn(u32, u64) -> bool) {
        let mut t = from;
        while t < until {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            let mut slots = vec![SlotRead::Empty; 3];
            slots[0] = slot(0, seq, &[0, 1, 2], false);
            // What a live peer hears: everyone up within the last peer timeout.
            let heard: Vec<u32> = [0u32, 1, 2].into_iter().filter(|h| *h == 0 || peer_up(*h, t.saturating_sub(T.peer_timeout_ms - 200))).collect();
            for p in [1u32, 2] {
                if peer_up(p, t) {
                    let beat = hb(p, seq, &heard, Some((0, seq)));
                    l.heartbeat_received(&beat, now.plus(1)).expect("fresh heartbeat");
                    slots[p as usize] = slot(p, seq, &heard, false);
                } else if let Some(SlotRead::Valid(s)) = l.peers.get(&HostId(p)).and_then(|ps| ps.slot).map(SlotRead::Valid) {
                    slots[p as usize] = SlotRead::Valid(s);
                }
            }
            l.disk_read(&slots, now.plus(2));
            t += 200;
        }
    }

    #[test]
    fn healthy_cluster_is_alive_and_does_not_fence() {
        let mut l = three(0);
        run(&mut l, 0, 10_000, |_, _| true);
        let a = l.assess(Millis(10_000));
        assert!(a.peers.iter().all(|p| p.liveness == HostLiveness::Alive));
        assert_eq!(a.fence, None);
        assert!(a.has_majority);
    }

    /// After a long pause (SIGSTOP, a frozen VM host) the lease has lapsed before the liveness
    /// loop runs again: nothing may start, and heartbeats queued during the pause that acknowledge
    /// our old sequence numbers do not renew it.
    #[test]
    fn lease_lapses_during_a_pause_and_stale_acks_do_not_renew_it() {
        let mut l = three(0);
        run(&mut l, 0, 4000, |_, _| true);
        assert!(l.lease_valid(Millis(4000)));
        assert!(l.lease_valid(Millis(3800 + T.self_fence_ms - 1)));
        let resumed = Millis(12_000);
        assert!(!l.lease_valid(resumed), "lease must lapse after self_fence_ms of silence");
        // Heartbeats that waited in the socket buffer ack the last sequence sent before the pause.
        for p in [1u32, 2] {
            l.heartbeat_received(&hb(p, 100 + u64::from(p), &[0, 1, 2], Some((0, 20))), resumed).expect("fresh");
        }
        assert!(!l.lease_valid(resumed));
        assert!(l.assess(resumed).fence.is_some(), "the first assessment after the pause fences");
    }

    /// A host restarted before its peers noticed: their first heartbeats still ack the last
    /// sequence number of its previous incarnation (far above the new ones). Those acks must
    /// not count, nor mask the acks of the new incarnation (found by simulator seed 13: the
    /// restarted host never regained a majority and never rejoined).
    #[test]
    fn acks_of_a_previous_incarnation_neither_count_nor_mask_new_ones() {
        let mut l = three(0);
        for p in [1u32, 2] {
            let stale = Heartbeat { ack: Some(Ack { incarnation: 0, seq: 5000 }), ..hb(p, 1, &[0, 1, 2], None) };
            l.heartbeat_received(&stale, Millis(0)).expect("fresh");
        }
        l.heartbeat_sent(1, Millis(0));
        assert!(!l.assess(Millis(1)).has_majority, "an ack of another life is no ack");
        run(&mut l, 200, 2000, |_, _| true);
        assert!(l.assess(Millis(2000)).has_majority, "acks of this incarnation count");
    }

    /// Host 2 hears host 1, which has fenced itself but still writes its slot hearing {1, 2};
    /// host 0 is cut off and hears only itself. Side {1, 2} holds the majority: host 2 must not
    /// fence (found by simulator seed 17, when fenced hosts were left out of the decision and
    /// host 2 lost a one-against-one tie to host 0).
    #[test]
    fn a_fenced_peer_still_counts_in_the_partition_decision() {
        let mut l = three(2);
        for step in 0..30u64 {
            let now = Millis(step * 200);
            l.heartbeat_sent(step + 1, now);
            l.disk_written(now, now.plus(1));
            let beat = Heartbeat { fenced: true, ..hb(1, step + 1, &[1, 2], Some((2, step + 1))) };
            l.heartbeat_received(&beat, now.plus(1)).expect("fresh");
            let slots = vec![slot(0, step + 1, &[0], false), slot(1, step + 1, &[1, 2], true), slot(2, step + 1, &[1, 2], false)];
            l.disk_read(&slots, now.plus(2));
            let a = l.assess(now.plus(3));
            assert_eq!(a.fence, None, "host 2 fenced at {now:?}");
        }
    }

    #[test]
    fn a_host_on_the_losing_side_holds_no_lease() {
        let mut l = three(0);
        run(&mut l, 0, 4000, |_, _| true);
        // Peers 1 and 2 still write their slots but no longer hear host 0: host 0 loses.
        let mut slots = vec![SlotRead::Empty; 3];
        slots[0] = slot(0, 99, &[0], false);
        slots[1] = slot(1, 99, &[1, 2], false);
        slots[2] = slot(2, 99, &[1, 2], false);
        l.disk_written(Millis(4000), Millis(4001));
        l.disk_read(&slots, Millis(4002));
        let _ = l.assess(Millis(4003));
        assert!(!l.lease_valid(Millis(4003)), "a host about to fence must not start VMs");
        // The verdict waits for its confirmation; the lease itself has not ended (the software
        // watchdog must not fence before the loop confirms the verdict).
        assert!(l.lease_until(Millis(4003)).is_some_and(|u| u > Millis(4003)));
    }

    #[test]
    fn power_loss_is_dead_with_a_deadline_after_the_self_fence_point() {
        let mut l = three(0);
        run(&mut l, 0, 10_000, |p, t| p != 2 || t < 5000);
        let a = l.assess(Millis(10_000));
        let p2 = a.peer(HostId(2)).expect("peer 2");
        assert_eq!(p2.liveness, HostLiveness::Dead);
        let dead_since = p2.dead_since.expect("dead spell");
        // Dead no earlier than a full peer timeout after the last sign of life.
        assert!(dead_since.0 >= 4801 + T.peer_timeout_ms - 200, "dead_since {dead_since}");
        // The deadline counts from the last evidence of life (host 2's last heartbeat or slot
        // change, before 5000), not from the declaration a peer timeout later.
        let evidence = p2.last_evidence.expect("evidence");
        assert!(evidence.0 < 5000 && evidence.0 >= 4800, "last evidence {evidence}");
        assert_eq!(p2.fence_deadline, Some(evidence.plus(T.fence_wait_ms())));
        assert!(p2.fence_deadline < Some(dead_since.plus(T.fence_wait_ms())), "earlier than the declaration-based deadline");
        assert_eq!(a.fence, None, "survivors keep a majority");
    }

    /// A host that ran alone (a fresh agent, or a one-host cluster) and then gains members counts
    /// its silence towards them from that moment: it does not fence at once because its start
    /// was long ago; and if none of them ever acknowledges it, it still fences `self_fence_ms`
    /// later. (Reproduced first by the simulator with the low-latency timings, seed 1: every
    /// host fenced while the cluster formed.)
    #[test]
    fn a_host_gaining_its_first_peers_does_not_fence_at_once() {
        let mut l = Liveness::new(HostId(0), 1, T, Millis(0));
        l.set_members_at(HostSet::single(HostId(0)), Millis(0));
        assert_eq!(l.assess(Millis(10_000)).fence, None, "alone: no lease needed");
        let members: HostSet = [HostId(0), HostId(1), HostId(2)].into_iter().collect();
        l.set_members_at(members, Millis(10_000));
        assert_eq!(l.assess(Millis(10_100)).fence, None, "the silence towards new members starts now");
        assert!(l.lease_valid(Millis(10_100)));
        // Nobody ever acknowledges it: it fences once the lease runs out.
        assert!(matches!(l.assess(Millis(10_000 + T.self_fence_ms)).fence, Some(FenceReason::Isolated { .. })));
        // A host that had proved itself to its peers gets no such grace when one more joins: its
        // lease still ends self_fence_ms after its last proof (3800), not after the join (4100).
        let mut m = three(0);
        run(&mut m, 0, 4000, |_, _| true);
        let four: HostSet = [HostId(0), HostId(1), HostId(2), HostId(3)].into_iter().collect();
        m.set_members_at(four, Millis(4100));
        assert!(matches!(m.assess(Millis(3800 + T.self_fence_ms + 100)).fence, Some(FenceReason::Isolated { .. })), "no grace for a proved host");
    }

    /// A host joining a running cluster is not yet in the heard-sets its peers wrote in their
    /// slots (they hear it only once they applied its join and its heartbeats reached them), so
    /// the slots show it apart from the majority for a while. It must not fence on that while its
    /// membership is new; a losing verdict that outlasts the grace still fences it. (Found by
    /// `bench heartbeat` with 64 agents: "h61: self-fenced: network partition: side {0..60}
    /// survives without us" right after it joined.)
    #[test]
    fn a_joining_host_is_not_fenced_by_slots_written_before_its_peers_heard_it() {
        let mut l = Liveness::new(HostId(3), 1, T, Millis(0));
        l.set_members_at(HostSet::single(HostId(3)), Millis(0));
        let four: HostSet = [0, 1, 2, 3].into_iter().map(HostId).collect();
        let join = 10_000;
        l.set_members_at(four, Millis(join));
        // Peers heartbeat to the newcomer and acknowledge it (its lease holds), but until
        // `heard_from` their slots say they hear only each other.
        let drive = |l: &mut Liveness, from: u64, until: u64, heard_from: u64| {
            let mut t = from;
            while t < until {
                let now = Millis(t);
                let seq = t / 200 + 1;
                l.heartbeat_sent(seq, now);
                l.disk_written(now, now.plus(1));
                let peers_hear: Vec<u32> = if t >= heard_from { vec![0, 1, 2, 3] } else { vec![0, 1, 2] };
                let mut slots = vec![SlotRead::Empty; 4];
                slots[3] = slot(3, seq, &[0, 1, 2, 3], false);
                for p in 0..3u32 {
                    l.heartbeat_received(&hb(p, seq, &peers_hear, Some((3, seq))), now.plus(1)).expect("fresh");
                    slots[p as usize] = slot(p, seq, &peers_hear, false);
                }
                l.disk_read(&slots, now.plus(2));
                if let Some(f) = l.assess(now.plus(3)).fence {
                    return Some((t, f));
                }
                t += 200;
            }
            None
        };
        // The peers' slots catch up 2 s after the join (a busy cluster applying many joins).
        assert_eq!(drive(&mut l, join, join + 4000, join + 2000), None, "no fence while the peers catch up");
        // A newcomer that stays apart from the majority past the grace still fences.
        let mut m = Liveness::new(HostId(3), 1, T, Millis(0));
        m.set_members_at(HostSet::single(HostId(3)), Millis(0));
        m.set_members_at(four, Millis(join));
        let fenced = drive(&mut m, join, join + 10_000, u64::MAX);
        assert!(matches!(fenced, Some((t, FenceReason::LosingSide { .. })) if t >= join + T.peer_timeout_ms), "{fenced:?}");
    }

    /// Drives host 0 from 5000 to 12,000 ms with host 2 silent on both channels (its slot stays
    /// at `slot_2`) and host 1 sending `beat_1(t, seq)`, which also sets what its slot says it hears.
    fn after_host_2_went_silent(l: &mut Liveness, slot_2: u64, beat_1: impl Fn(u64, u64) -> Heartbeat) {
        let mut t = 5000;
        while t < 12_000 {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            let beat = beat_1(t, seq);
            let heard: Vec<u32> = beat.heard.iter().map(|h| h.0).collect();
            l.heartbeat_received(&beat, now.plus(1)).expect("fresh");
            let mut slots = vec![SlotRead::Empty; 3];
            slots[0] = slot(0, seq, &[0, 1, 2], false);
            slots[1] = slot(1, seq, &heard, false);
            slots[2] = slot(2, slot_2, &[0, 1, 2], false);
            l.disk_read(&slots, now.plus(2));
            t += 200;
        }
    }

    /// What another host reports it heard of a peer is evidence too: host 1 heard host 2 a
    /// second after host 0 lost it, so the deadline counts from there, not from host 0's view.
    #[test]
    fn evidence_reported_by_others_counts_and_moves_the_deadline_later() {
        let mut l = three(0);
        run(&mut l, 0, 5000, |_, _| true);
        // From 5000 host 0 hears host 2 no more; host 1 reports hearing it until 6000.
        after_host_2_went_silent(&mut l, 26, |t, seq| {
            let heard: Vec<u32> = if t < 6000 + T.peer_timeout_ms - 200 { vec![0, 1, 2] } else { vec![0, 1] };
            let mut beat = hb(1, seq, &heard, Some((0, seq)));
            beat.ages.set(HostId(2), t.saturating_sub(6000).min(60_000));
            beat
        });
        let a = l.assess(Millis(12_000));
        let p2 = a.peer(HostId(2)).expect("peer 2");
        assert_eq!(p2.liveness, HostLiveness::Dead);
        let evidence = p2.last_evidence.expect("evidence");
        assert!(evidence.0 >= 6000, "host 1's report is evidence: {evidence}");
        assert_eq!(p2.fence_deadline, Some(evidence.plus(T.fence_wait_ms())));
    }

    /// Without a majority acknowledging a heartbeat sent `self_fence_ms` after the evidence (the
    /// reports that would show a later renewal have not come), the deadline falls back to the
    /// declaration-based one.
    #[test]
    fn unsettled_evidence_falls_back_to_the_declaration_deadline() {
        let mut l = three(0);
        run(&mut l, 0, 5000, |_, _| true);
        // Host 2 goes silent at 5000; host 1's heartbeats arrive but no longer ack ours.
        after_host_2_went_silent(&mut l, 25, |_, seq| hb(1, seq, &[0, 1], None));
        let a = l.assess(Millis(12_000));
        let p2 = a.peer(HostId(2)).expect("peer 2");
        assert_eq!(p2.liveness, HostLiveness::Dead);
        let dead_since = p2.dead_since.expect("dead spell");
        assert_eq!(p2.fence_deadline, Some(dead_since.plus(T.fence_wait_ms())), "no settled evidence: the later deadline");
    }

    /// A dead host is declared dead once every report of it is a peer timeout old. A peer's
    /// slot read before its latest heartbeat arrived is the older word and does not keep the
    /// host "partitioned" for another disk round (the coordinator's failover waited for it).
    #[test]
    fn a_slot_older_than_its_writers_heartbeat_does_not_keep_a_dead_host_partitioned() {
        let mut l = three(0);
        run(&mut l, 0, 5000, |_, _| true);
        // Host 2 lost power after its heartbeat and slot of 4800; everyone last heard it at 4801.
        let last_heard = 4801;
        let mut heard_1_before = vec![0, 1, 2];
        let mut declared = None;
        let mut t = 5000;
        while t < 9000 {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            let heard_1: Vec<u32> = if t - last_heard < T.peer_timeout_ms { vec![0, 1, 2] } else { vec![0, 1] };
            // The disk round reads host 1's slot as host 1 wrote it a round ago ...
            let mut slots = vec![SlotRead::Empty; 3];
            slots[0] = slot(0, seq, &[0, 1, 2], false);
            slots[1] = slot(1, seq - 1, &heard_1_before, false);
            slots[2] = slot(2, 25, &[0, 1, 2], false);
            l.disk_read(&slots, now.plus(1));
            // ... then host 1's heartbeat of this round arrives, saying when it last heard host 2.
            let mut beat = hb(1, seq, &heard_1, Some((0, seq)));
            beat.ages.set(HostId(2), t - last_heard);
            l.heartbeat_received(&beat, now.plus(2)).expect("fresh");
            heard_1_before = heard_1;
            let a = l.assess(now.plus(3));
            if declared.is_none() && a.peer(HostId(2)).is_some_and(|p| p.liveness == HostLiveness::Dead) {
                declared = Some(t);
            }
            t += 200;
        }
        assert_eq!(declared, Some(7800), "dead at the first assessment a peer timeout after anyone heard it");
    }

    /// A renewal that arrives after the lease lapsed does not continue it: the next assessment
    /// fences, and no VM may start in between.
    #[test]
    fn a_late_renewal_does_not_revive_a_lapsed_lease() {
        let mut l = three(0);
        run(&mut l, 0, 4000, |_, _| true);
        // Silence until 6500 (past self_fence_ms), then an ack of a heartbeat sent at 6400.
        l.heartbeat_sent(100, Millis(6400));
        l.heartbeat_received(&hb(1, 100, &[0, 1, 2], Some((0, 100))), Millis(6450)).expect("fresh");
        l.heartbeat_received(&hb(2, 100, &[0, 1, 2], Some((0, 100))), Millis(6450)).expect("fresh");
        assert!(!l.lease_valid(Millis(6460)), "a lapsed lease is not renewed by a late ack");
        let a = l.assess(Millis(6500));
        assert!(matches!(a.fence, Some(FenceReason::Isolated { .. })), "it fences: {:?}", a.fence);
    }

    #[test]
    fn disk_alive_peer_is_partitioned_not_dead() {
        let mut l = three(0);
        run(&mut l, 0, 4000, |_, _| true);
        // Host 2 keeps writing its slot but its heartbeats stop reaching us and host 1.
        for t in (4000..9000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            l.heartbeat_received(&hb(1, seq, &[0, 1], Some((0, seq))), now).expect("fresh");
            l.disk_read(&[slot(0, seq, &[0, 1], false), slot(1, seq, &[0, 1], false), slot(2, seq, &[2], false)], now);
        }
        let a = l.assess(Millis(9000));
        assert_eq!(a.peer(HostId(2)).map(|p| p.liveness), Some(HostLiveness::Partitioned));
        assert_eq!(a.peer(HostId(2)).and_then(|p| p.fence_deadline), None);
        assert_eq!(a.fence, None, "host 0 is on the winning side");
    }

    /// A host whose path to the heartbeat disk switched to a stale private copy (and whose
    /// network is cut) keeps writing and reading "its" disk: its own slot advances there, the
    /// peers' slots no longer do. Those writes renew nothing — the peers cannot see them and
    /// count its fence deadline from its last heartbeat — although the copy still looks shared
    /// by its old changes for a peer timeout. (Simulator seed 237 found the lease extended.)
    #[test]
    fn writes_to_a_disk_that_only_was_shared_renew_no_lease() {
        let mut l = three(0);
        let mut last_ack = Millis(0);
        for t in (0..2000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.heartbeat_received(&hb(1, seq, &[0, 1, 2], Some((0, seq))), now).expect("fresh");
            l.heartbeat_received(&hb(2, seq, &[0, 1, 2], Some((0, seq))), now).expect("fresh");
            last_ack = now;
            l.disk_written(now, now);
            l.disk_read(&[slot(0, seq, &[0, 1, 2], false), slot(1, seq, &[0, 1, 2], false), slot(2, seq, &[0, 1, 2], false)], now);
        }
        let frozen = 2000 / 200;
        for t in (2000..5000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.disk_written(now, now);
            l.disk_read(&[slot(0, seq, &[0], false), slot(1, frozen, &[0, 1, 2], false), slot(2, frozen, &[0, 1, 2], false)], now);
            let until = l.lease_until(now).expect("a member of three holds a lease");
            assert!(until.0 <= last_ack.0 + T.self_fence_ms, "at {t} ms the lease runs to {until:?}, past the last acknowledged heartbeat + self_fence_ms");
        }
        assert!(matches!(l.assess(Millis(4800)).fence, Some(FenceReason::Isolated { .. })), "the host fences itself");
    }

    /// Writes to the shared disk renew the lease once a read shows them there and shows the
    /// peers still writing to it after them: a host cut from the network but not from the disk
    /// keeps its lease by the disk.
    #[test]
    fn writes_to_the_shared_disk_renew_the_lease_once_reads_confirm_them() {
        let mut l = three(0);
        for t in (0..5000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.disk_written(now, now);
            l.disk_read(&[slot(0, seq, &[0], false), slot(1, seq, &[1, 2], false), slot(2, seq, &[1, 2], false)], now);
            if t >= 400 {
                let until = l.lease_until(now).expect("lease");
                assert!(until.0 + 400 >= now.0 + T.self_fence_ms, "at {t} ms the lease runs to {until:?}: the disk renews it, a read or two behind");
            }
        }
    }

    #[test]
    fn cut_off_host_fences_itself_on_the_losing_side() {
        let mut l = three(2);
        for t in (0..2000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now);
            l.heartbeat_received(&hb(0, seq, &[0, 1, 2], Some((2, seq))), now).expect("fresh");
            l.heartbeat_received(&hb(1, seq, &[0, 1, 2], Some((2, seq))), now).expect("fresh");
            l.disk_read(&[slot(0, seq, &[0, 1, 2], false), slot(1, seq, &[0, 1, 2], false), slot(2, seq, &[0, 1, 2], false)], now);
        }
        assert_eq!(l.assess(Millis(2000)).fence, None);
        // Network cut: only disk slots keep flowing, and they show hosts 0 and 1 hearing each other.
        let mut fenced_at = None;
        for t in (2000..9000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.disk_written(now, now);
            // The others stop listing host 2 once they have not heard it for a peer timeout.
            let theirs: &[u32] = if t < 2000 + T.peer_timeout_ms { &[0, 1, 2] } else { &[0, 1] };
            l.disk_read(&[slot(0, seq, theirs, false), slot(1, seq, theirs, false), slot(2, seq, &[2], false)], now);
            if let Some(FenceReason::LosingSide { winner }) = l.assess(now).fence {
                assert_eq!(winner, [HostId(0), HostId(1)].into_iter().collect());
                fenced_at = Some(t);
                break;
            }
        }
        let at = fenced_at.expect("host 2 must fence");
        assert!(at >= 2000 + T.peer_timeout_ms, "fenced too early at {at}");
    }

    #[test]
    fn isolated_host_without_disk_fences_after_self_fence_time() {
        let mut l = three(1);
        for t in (0..1000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.heartbeat_received(&hb(0, seq, &[0, 1, 2], Some((1, seq))), now).expect("fresh");
        }
        // From 1000 on: nothing acknowledged, no disk writes.
        let mut fenced_at = None;
        for t in (1000..5000).step_by(100) {
            if let Some(FenceReason::Isolated { .. }) = l.assess(Millis(t)).fence {
                fenced_at = Some(t);
                break;
            }
        }
        let at = fenced_at.expect("must fence");
        assert!((800 + T.self_fence_ms..=1000 + T.self_fence_ms + 100).contains(&at), "fenced at {at}");
    }

    #[test]
    fn lost_disk_with_network_is_no_fence_and_peers_are_alive() {
        let mut l = three(0);
        for t in (0..10_000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_write_failed();
            l.disk_read_failed();
            for p in [1, 2] {
                l.heartbeat_received(&hb(p, seq, &[0, 1, 2], Some((0, seq))), now).expect("fresh");
            }
        }
        let a = l.assess(Millis(10_000));
        assert_eq!(a.fence, None);
        assert!(a.peers.iter().all(|p| p.liveness == HostLiveness::Alive));
    }

    #[test]
    fn silent_peer_without_readable_disk_is_unknown_never_dead() {
        let mut l = three(0);
        for t in (0..10_000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.heartbeat_received(&hb(1, seq, &[0, 1], Some((0, seq))), now).expect("fresh");
        }
        let a = l.assess(Millis(10_000));
        let p2 = a.peer(HostId(2)).expect("peer");
        assert_eq!(p2.liveness, HostLiveness::Unknown);
        assert_eq!(p2.fence_deadline, None);
    }

    #[test]
    fn replayed_and_foreign_heartbeats_are_rejected_and_counted() {
        let mut l = three(0);
        l.heartbeat_received(&hb(1, 5, &[1], None), Millis(1)).expect("first");
        assert!(matches!(l.heartbeat_received(&hb(1, 5, &[1], None), Millis(2)), Err(HeartbeatRejected::Replay { .. })));
        assert!(matches!(l.heartbeat_received(&hb(1, 4, &[1], None), Millis(3)), Err(HeartbeatRejected::Replay { .. })));
        assert_eq!(l.counters().replayed_heartbeats, 2);
        assert_eq!(l.heartbeat_received(&hb(9, 1, &[9], None), Millis(3)), Err(HeartbeatRejected::NotMember(HostId(9))));
        assert_eq!(l.heartbeat_received(&hb(0, 1, &[0], None), Millis(3)), Err(HeartbeatRejected::FromSelf));
        // A restarted peer (higher incarnation) starts its sequence again.
        let mut restarted = hb(1, 1, &[1], None);
        restarted.incarnation = 2;
        assert_eq!(l.heartbeat_received(&restarted, Millis(4)), Ok(()));
        // A genuine copy addressed to another host is refused: it acknowledges that host's
        // heartbeats, not ours.
        let for_2 = Heartbeat { to: HostId(2), ..hb(1, 9, &[1], None) };
        assert_eq!(l.heartbeat_received(&for_2, Millis(5)), Err(HeartbeatRejected::Misaddressed { from: HostId(1), to: HostId(2) }));
    }

    /// Each peer is answered in the format it sends: one of the previous release (broadcast)
    /// keeps hearing us during a rolling upgrade.
    #[test]
    fn a_peer_is_answered_in_its_own_format() {
        let mut l = three(0);
        assert_eq!(l.format_of(HostId(1)), HeartbeatFormat::Addressed);
        l.heartbeat_received_as(&hb(1, 1, &[0, 1], Some((0, 1))), HeartbeatFormat::Broadcast, Millis(10)).expect("fresh");
        assert_eq!(l.format_of(HostId(1)), HeartbeatFormat::Broadcast);
        assert_eq!(l.format_of(HostId(2)), HeartbeatFormat::Addressed);
        let acks = l.broadcast_acks(Millis(30));
        assert_eq!(acks, vec![BroadcastAck { host: HostId(1), ack: Ack { incarnation: 1, seq: 1 }, age_ms: 20 }]);
        let common = hb(0, 5, &[0, 1], None);
        assert_eq!(l.addressed(&common, HostId(1)).ack, Some(Ack { incarnation: 1, seq: 1 }));
        assert_eq!(l.addressed(&common, HostId(2)).ack, None, "nothing heard from host 2 yet");
    }

    /// A reporter that restarts forgets what it heard; what it reported before stays evidence.
    #[test]
    fn a_restarted_reporter_does_not_take_back_its_evidence() {
        let mut l = three(0);
        let mut before = hb(1, 7, &[0, 1, 2], Some((0, 1)));
        before.ages.set(HostId(2), 100);
        l.heartbeat_received(&before, Millis(1000)).expect("fresh");
        let mut after = hb(1, 1, &[0, 1], None);
        after.incarnation = 2;
        l.heartbeat_received(&after, Millis(1200)).expect("a new incarnation");
        l.assess(Millis(1300));
        assert_eq!(l.peers.get(&HostId(2)).and_then(|p| p.reported_at), Some(Millis(900)));
    }

    #[test]
    fn corrupt_slot_is_counted_once_and_not_trusted() {
        let mut l = three(0);
        let bad = SlotRead::Corrupt(SlotCorruption::BadChecksum);
        l.disk_read(&[SlotRead::Empty, bad, SlotRead::Empty], Millis(0));
        l.disk_read(&[SlotRead::Empty, bad, SlotRead::Empty], Millis(200));
        assert_eq!(l.counters().corrupt_slots, 1);
        let a = l.assess(Millis(200));
        assert!(a.peer(HostId(1)).is_some_and(|p| p.slot_corrupt && p.disk_age_ms.is_none()));
    }

    #[test]
    fn one_heartbeat_in_three_lost_never_fences_or_kills() {
        // A deterministic pseudo-random loss pattern: every packet has a 1/3 chance of loss.
        let mut l = three(0);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut lost = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.is_multiple_of(3)
        };
        // Per peer: (first seq delivered, last seq delivered, delivered count).
        let mut delivered = [(0u64, 0u64, 0u64); 3];
        for t in (0..600_000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            for p in [1, 2] {
                let ack_arrives = !lost();
                if !lost() {
                    let beat = hb(p, seq, &[0, 1, 2], ack_arrives.then_some((0, seq.saturating_sub(1))));
                    l.heartbeat_received(&beat, now).expect("fresh");
                    let d = &mut delivered[p as usize];
                    *d = (if d.2 == 0 { seq } else { d.0 }, seq, d.2 + 1);
                }
            }
            let a = l.assess(now);
            assert_eq!(a.fence, None, "fenced at {t}");
            if t > 5000 {
                assert!(a.peers.iter().all(|p| p.liveness == HostLiveness::Alive), "peer lost at {t}");
            }
        }
        // The loss is measured: every gap between delivered sequence numbers is counted.
        for c in l.heartbeat_counts() {
            let (first, last, n) = delivered[c.host.0 as usize];
            assert_eq!((c.received, c.missed), (n, last - first + 1 - n), "{c:?}");
            assert!(c.missed > 0);
        }
    }
    /// Host 0's `heartbeat_disk` is a private file (a typo, a missing mount, a copy): its own
    /// slot writes land, but it reads nobody else advancing there. Cut off from the network it
    /// must fence — its peers see its slot silent on the real disk, declare it dead and restart
    /// its VMs once its fence deadline has passed.
    #[test]
    fn a_host_on_a_private_disk_fences_when_cut_off() {
        let mut l = three(0);
        let mut fenced_at = None;
        for t in (0..12_000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            if t < 4000 {
                for p in [1, 2] {
                    l.heartbeat_received(&hb(p, seq, &[0, 1, 2], Some((0, seq))), now.plus(1)).expect("fresh");
                }
            }
            // Only our own slot advances on the private copy; the peers' slots are frozen copies.
            l.disk_read(&[slot(0, seq, &[0], false), slot(1, 3, &[0, 1, 2], false), slot(2, 3, &[0, 1, 2], false)], now.plus(2));
            if let Some(FenceReason::Isolated { .. }) = l.assess(now.plus(3)).fence {
                fenced_at = Some(t);
                break;
            }
        }
        let at = fenced_at.expect("a cut-off host on a private disk must fence");
        assert!(at <= 4000 + T.self_fence_ms + 200, "fenced too late at {at}");
        assert!(!l.lease_valid(Millis(at + 3)));
    }

    /// A host that can write its slot but reads nothing (read path broken) and is cut off.
    #[test]
    fn a_host_that_writes_but_cannot_read_fences_when_cut_off() {
        let mut l = three(0);
        run(&mut l, 0, 4000, |_, _| true);
        let mut fenced = false;
        for t in (4000..9000).step_by(200) {
            let now = Millis(t);
            l.heartbeat_sent(t / 200 + 1, now);
            l.disk_written(now, now.plus(1));
            l.disk_read_failed();
            if l.assess(now.plus(3)).fence.is_some() {
                fenced = true;
                break;
            }
        }
        assert!(fenced, "a write-only host cut off from the network must fence");
    }

    /// A host on a private disk that still hears one peer must not call the other peer dead: its
    /// disk proves nothing about anyone (the silent peer may be alive on the real disk).
    #[test]
    fn a_private_disk_is_no_evidence_of_death() {
        let mut l = three(0);
        for t in (0..10_000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            l.heartbeat_received(&hb(1, seq, &[0, 1], Some((0, seq))), now.plus(1)).expect("fresh");
            l.disk_read(&[slot(0, seq, &[0, 1], false), SlotRead::Empty, SlotRead::Empty], now.plus(2));
        }
        let a = l.assess(Millis(10_000));
        assert_eq!(a.peer(HostId(2)).map(|p| p.liveness), Some(HostLiveness::Unknown));
        assert_eq!(a.peer(HostId(2)).and_then(|p| p.fence_deadline), None);
        assert_eq!(a.fence, None, "host 0 still has a network majority");
    }

    /// The shared disk keeps a lone network-isolated host's lease only while it reads a majority
    /// advancing there: with its two peers writing, it is partitioned, not isolated.
    #[test]
    fn a_shared_disk_with_a_majority_advancing_counts_for_the_lease() {
        let mut l = three(0);
        for t in (0..6000).step_by(200) {
            let now = Millis(t);
            let seq = t / 200 + 1;
            l.heartbeat_sent(seq, now);
            l.disk_written(now, now.plus(1));
            l.disk_read(&[slot(0, seq, &[0], false), slot(1, seq, &[0, 1, 2], false), SlotRead::Empty], now.plus(2));
        }
        assert!(l.lease_valid(Millis(6000)), "two of three advancing on the disk: it is shared");
    }
    /// A slot read after a fresher heartbeat must not override it: host 1 wrote "fenced in
    /// epoch 1" to its slot, then rejoined and says "not fenced" on the network; a reader that
    /// sees the old slot content afterwards still takes the newer word.
    #[test]
    fn a_stale_slot_never_overrides_a_fresher_heartbeat() {
        let mut l = three(0);
        run(&mut l, 0, 2000, |_, _| true);
        // t=2000: the slot changes to "fenced in epoch 1".
        l.disk_read(&[SlotRead::Empty, slot(1, 500, &[0, 1, 2], true), SlotRead::Empty], Millis(2000));
        assert_eq!(l.assess(Millis(2001)).peer(HostId(1)).and_then(|p| p.fenced_epoch), Some(1));
        // t=2100: a newer heartbeat says it is no longer fenced; the slot, unchanged since, is older.
        l.heartbeat_received(&hb(1, 900, &[0, 1, 2], Some((0, 10))), Millis(2100)).expect("fresh");
        l.disk_read(&[SlotRead::Empty, slot(1, 500, &[0, 1, 2], true), SlotRead::Empty], Millis(2150));
        assert_eq!(l.assess(Millis(2200)).peer(HostId(1)).and_then(|p| p.fenced_epoch), None);
        // A slot that changes after the heartbeat is the newer word again.
        l.disk_read(&[SlotRead::Empty, slot(1, 501, &[0, 1, 2], true), SlotRead::Empty], Millis(2300));
        assert_eq!(l.assess(Millis(2301)).peer(HostId(1)).and_then(|p| p.fenced_epoch), Some(1));
    }
    /// A receiver that restarted knows nothing of its peers' incarnations; the slots tell it. A
    /// recorded heartbeat of a peer's previous life, replayed afterwards, is refused.
    #[test]
    fn recorded_heartbeats_of_an_older_incarnation_are_refused_after_a_restart() {
        let mut l = three(0);
        let mut old = hb(1, 4000, &[0, 1, 2], None);
        old.incarnation = 6;
        let live = SlotRead::Valid(match slot(1, 10, &[0, 1, 2], false) {
            SlotRead::Valid(s) => DiskSlot { incarnation: 7, ..s },
            other => panic!("{other:?}"),
        });
        l.disk_read(&[SlotRead::Empty, live, SlotRead::Empty], Millis(100));
        assert!(matches!(l.heartbeat_received(&old, Millis(150)), Err(HeartbeatRejected::Replay { .. })));
        assert_eq!(l.assess(Millis(200)).peer(HostId(1)).and_then(|p| p.net_age_ms), None, "a replay made the peer look heard");
        let mut current = hb(1, 1, &[0, 1, 2], None);
        current.incarnation = 7;
        assert_eq!(l.heartbeat_received(&current, Millis(300)), Ok(()));
    }

    proptest::proptest! {
        /// For any timings `validate` accepts: a host cut off at an arbitrary instant loses its
        /// lease (and so has killed its VMs, given `kill_grace_ms`) before the fence deadline a
        /// survivor computes for it — with the survivor's clock running up to 1000 ppm slow.
        /// (It replaces an assertion that held by construction: this one runs both sides of the
        /// argument through the real code.)
        #[test]
        fn a_cut_off_host_loses_its_lease_before_any_survivor_may_restart_its_vms(
            interval in 20u64..400, timeout_x in 10u64..30, fence_x in 5u64..12, grace in 100u64..2000, margin in 100u64..2000,
            cut_at in 2_000u64..20_000,
        ) {
            let t = Timings {
                heartbeat_interval_ms: interval,
                peer_timeout_ms: interval * timeout_x,
                self_fence_ms: interval * fence_x,
                disk_io_timeout_ms: interval,
                kill_grace_ms: grace,
                clock_margin_ms: margin,
                partition_confirm_ms: interval * timeout_x / 2,
            };
            proptest::prop_assume!(t.validate().is_ok());
            let members: HostSet = [HostId(0), HostId(1), HostId(2)].into_iter().collect();
            // Host 2 (cut off at `cut_at`) and host 0 (a survivor that stops hearing it).
            let mut cut = Liveness::new(HostId(2), 1, t, Millis(0));
            let mut survivor = Liveness::new(HostId(0), 1, t, Millis(0));
            cut.set_members(members);
            survivor.set_members(members);
            let beat = |from: u32, seq: u64, ack: (u32, u64)| Heartbeat {
                from: HostId(from), incarnation: 1, seq, epoch: 1, heard: members, fenced: false,
                to: HostId(ack.0), ack: Some(Ack { incarnation: 1, seq: ack.1 }), ages: HeardAges::default(),
            };
            let mut now = 0;
            let mut seq = 0;
            while now <= cut_at {
                seq += 1;
                cut.heartbeat_sent(seq, Millis(now));
                survivor.heartbeat_sent(seq, Millis(now));
                // Each side hears the other and host 1, and is acknowledged by both.
                for from in [0u32, 1] {
                    cut.heartbeat_received(&beat(from, seq, (2, seq)), Millis(now)).expect("fresh");
                }
                for from in [1u32, 2] {
                    survivor.heartbeat_received(&beat(from, seq, (0, seq)), Millis(now)).expect("fresh");
                }
                survivor.disk_written(Millis(now), Millis(now + 1));
                survivor.disk_read(&[slot(0, seq, &[0, 1, 2], false), slot(1, seq, &[0, 1, 2], false), slot(2, seq, &[0, 1, 2], false)], Millis(now + 1));
                now += interval;
            }
            let last_slot_of_2 = seq;
            // After the cut: host 0 still hears host 1, which no longer hears host 2.
            let mut lease_end = None;
            let mut deadline = None;
            let two: HostSet = [HostId(0), HostId(1)].into_iter().collect();
            while (lease_end.is_none() || deadline.is_none()) && now < cut_at + 60_000 {
                seq += 1;
                cut.heartbeat_sent(seq, Millis(now));
                survivor.heartbeat_sent(seq, Millis(now));
                let from1 = Heartbeat { heard: two, ..beat(1, seq, (0, seq)) };
                survivor.heartbeat_received(&from1, Millis(now)).expect("fresh");
                // Host 2 lost the network and its disk path: its slot stops changing.
                survivor.disk_written(Millis(now), Millis(now + 1));
                survivor.disk_read(&[slot(0, seq, &[0, 1], false), slot(1, seq, &[0, 1], false), slot(2, last_slot_of_2, &[0, 1, 2], false)], Millis(now + 1));
                cut.disk_write_failed();
                if lease_end.is_none() && !cut.lease_valid(Millis(now)) {
                    lease_end = Some(now);
                }
                let a = survivor.assess(Millis(now));
                if let Some(d) = a.peer(HostId(2)).and_then(|p| p.fence_deadline) {
                    deadline.get_or_insert(d.0);
                }
                now += interval;
            }
            let (lease_end, deadline) = (lease_end.expect("the lease lapses"), deadline.expect("a deadline is set"));
            // The survivor's clock may run slow: its deadline comes later in real time, never
            // earlier than this.
            let deadline_real = deadline - deadline * 1000 / 1_000_000;
            proptest::prop_assert!(
                lease_end + t.kill_grace_ms <= deadline_real,
                "lease ends {lease_end} + kill grace {} > deadline {deadline_real}", t.kill_grace_ms
            );
        }
    }
}
