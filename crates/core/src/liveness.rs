//! What one host knows about every other host, and when it must fence itself.
//!
//! [`Liveness`] is fed every heartbeat received, every heartbeat sent, every disk read and write
//! outcome, each with the time it happened; [`Liveness::assess`] turns that into a classification
//! of each peer, the partition verdict, fence deadlines and the self-fence decision.
//!
//! One room per concept: `network` (heartbeats in and out, acks, what each peer reports),
//! `disk` (slot reads and writes, when a write counts as a renewal, whether the disk is shared),
//! `lease` (this host's own lease and its lapses), `cadence` (which ticks are full rounds) and
//! `assess` (the classification, fence deadlines and the fence decision).

use crate::hostset::{HostId, HostSet};
use crate::time::Millis;
use crate::timing::Timings;
use crate::wire::{DiskSlot, HeardAges, HeartbeatFormat, SlotCorruption};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use thiserror::Error;

mod assess;
mod cadence;
mod disk;
mod lease;
mod network;

pub use assess::{Assessment, PeerAssessment};
pub use cadence::{calm_round_spacing_ms, CALM_COPY_TICKS, CALM_ROUND_TICKS, CALM_WRITES_PER_PEER_TIMEOUT};

/// How many of our own recent heartbeat send times are remembered to interpret acks.
const SENT_HISTORY: usize = 512;

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
    /// When this host began to hear the peer on the network in the current spell (its first
    /// heartbeat after a peer timeout or more without one): words the peer spoke less than a
    /// peer timeout after it do not show that it cannot hear us (see `assess`).
    net_spell_began: Option<Millis>,
    net_fenced: bool,
    net_epoch: u64,
    slot: Option<DiskSlot>,
    slot_changed_at: Option<Millis>,
    /// When the read before the one that saw the slot's last change began: the peer wrote that
    /// change after this instant (it was not there yet).
    slot_changed_after: Option<Millis>,
    slot_corrupt: Option<SlotCorruption>,
    acked_my_seq: Option<u64>,
    /// The sequence number of the last copy of our heartbeat sent to this peer.
    last_copy_seq: Option<u64>,
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
    /// The hosts the reporter heard when it sent it (itself included): what its slot written
    /// at that moment would say.
    heard: HostSet,
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

/// This host's view of the cluster's liveness.
#[derive(Clone, Debug)]
pub struct Liveness {
    me: HostId,
    /// Our own incarnation: acks of any other do not acknowledge our heartbeats.
    incarnation: u64,
    timings: Timings,
    members: HostSet,
    /// The hosts of the cluster's preferred site (committed settings): a split that leaves no
    /// side a majority keeps theirs.
    preferred: HostSet,
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
    /// Until when the network alone kept the lease when it was last found not lapsed (see
    /// [`Liveness::note_lapse`]): a renewal taken before then needs no check.
    unlapsed_until: Option<Millis>,
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
    /// Set while this host announces its own fence (see [`Liveness::set_announcing_fence`]):
    /// the cluster is then never calm, so every tick writes the slot and every peer gets every
    /// heartbeat.
    announcing_fence: bool,
    /// The cluster keeps a disk witness on the heartbeat disk (see [`crate::witness`]): in a
    /// two-host cluster it is the third vote, and the disk that holds it speaks for it.
    disk_witness: bool,
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
            preferred: HostSet::EMPTY,
            peers: BTreeMap::new(),
            sent: VecDeque::with_capacity(SENT_HISTORY),
            started: now,
            last_disk_read_ok: None,
            last_disk_read_started: None,
            last_disk_write_ok: None,
            pending_disk_writes: VecDeque::with_capacity(disk::PENDING_DISK_WRITES),
            own_advanced_read: None,
            lapsed: None,
            unlapsed_until: None,
            own_slot: None,
            own_slot_advanced_at: None,
            losing_since: None,
            round_begun_at: None,
            grown_at: None,
            announcing_fence: false,
            disk_witness: false,
            counters: RejectCounters::default(),
        }
    }

    /// The hosts of the preferred site, from committed state (see [`crate::partition::decide_preferring`]).
    pub fn set_preferred(&mut self, preferred: HostSet) {
        self.preferred = preferred;
    }

    /// Says whether the cluster keeps a disk witness (configuration; the same on every host).
    pub fn set_disk_witness(&mut self, on: bool) {
        self.disk_witness = on;
        self.unlapsed_until = None;
    }

    /// The votes the shared disk carries besides the slots on it: the disk witness's, in a
    /// two-host cluster that keeps one. A read of that disk then counts as hearing the witness,
    /// so a lone survivor whose own slot advances on it holds two votes of three. This trusts
    /// the disk to be one device (no private copies): the configuration says so by choosing
    /// the witness (ARCHITECTURE.md, "The disk witness").
    pub(crate) fn disk_votes(&self) -> usize {
        usize::from(self.disk_witness && self.members.len() == 2)
    }

    /// Peers whose slots must be seen advancing, besides our own, for a majority of the voters
    /// on the disk.
    pub(crate) fn disk_peers_needed(&self) -> usize {
        let voters = self.members.len() + self.disk_votes();
        (voters / 2 + 1).saturating_sub(1 + self.disk_votes())
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
        self.unlapsed_until = None;
        self.peers.retain(|h, _| m.contains(*h));
        for h in m.iter().filter(|h| *h != self.me) {
            self.peers.entry(h).or_default();
        }
    }
}

#[cfg(test)]
mod tests;
