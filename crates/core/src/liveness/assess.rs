//! The assessment: each peer's classification, fence deadlines, the partition verdict and the
//! self-fence decision.

use super::{FenceReason, HostLiveness, Liveness, PeerState};
use crate::hostset::{HostId, HostSet, MAX_HOSTS};
use crate::partition::{self, Survival};
use crate::time::Millis;
use serde::Serialize;
use std::collections::BTreeMap;

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
    /// Whether a majority of the voters acknowledged us within the peer timeout: of the members
    /// on the network, or — in a two-host cluster with a disk witness — the witness on the
    /// shared disk, through a confirmed slot write.
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

impl Liveness {
    /// Whether some host of `side` was heard, on the network or by a slot change, after `since`.
    fn spoke_since(&self, side: HostSet, since: Millis) -> bool {
        side.iter().filter_map(|h| self.peers.get(&h)).any(|p| [p.last_net, p.slot_changed_at].into_iter().flatten().any(|at| at > since))
    }

    /// Folds every peer's latest report into the others' `reported_at`.
    pub(super) fn fold_reports(&mut self) {
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
        //
        // Whom a peer hears is the newer of its two words, as for `heard_by_others` below: its
        // slot, or its latest heartbeat when that came after the slot last changed. A slot
        // written just before the peer heard us again (we were cut off, and back) otherwise
        // kept saying it did not hear us until its next change reached us. Across a real cut
        // no heartbeat comes, so the other side's word there is its slot alone.
        //
        // A peer we hear whose word was spoken less than a peer timeout after we began to hear
        // it again does not yet show that it cannot hear us: a heal reaches the two ends of a
        // link unevenly, and the peer hears us only when our first heartbeat gets through — a
        // second later, or never if it is cut off again first. Its word then counts as hearing
        // us. Read as it stands, it made a link broken one way that the peer won, and we fenced,
        // healthy and connected (the fault suite, two sites and a network witness: a heal, and
        // a cut of the peer within the second). A link that stays broken one way has the peer
        // say so again a peer timeout later, and the verdict stands then. Safety does not rest
        // on the verdict's fence (as with `settling` below): a host apart from the winner is
        // failed over only once it reports itself fenced, or is dead past its fence deadline.
        for (h, p) in &self.peers {
            if slot_fresh(p) {
                disk_alive.insert(*h);
                if let Some(s) = p.slot {
                    let newer_heartbeat = p.report.filter(|r| net_fresh(p) && p.slot_changed_at.is_none_or(|c| r.at > c));
                    let (mut peer_hears, spoken_at) = newer_heartbeat.map_or((s.heard, p.slot_changed_at), |r| (r.heard, Some(r.at)));
                    let spoken_early = p.net_spell_began.zip(spoken_at).is_some_and(|(b, w)| w < b.plus(t.peer_timeout_ms));
                    if net_fresh(p) && spoken_early {
                        peer_hears.insert(self.me);
                    }
                    reports.insert(*h, peer_hears);
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
        // With a disk witness and two hosts, the only peer to hear from is the one in question:
        // the disk's word alone settles it (the witness on it is the other vote).
        let net_settles = self.disk_peers_needed() == 0 && disk_shared;
        let evidence_settled = |e: Millis| {
            (net_settles || majority_at.is_some_and(|m| m >= e.plus(t.self_fence_ms)))
                && read_started.is_some_and(|r| r >= e.plus(t.self_fence_ms + t.disk_io_timeout_ms))
        };
        let mut peers = Vec::with_capacity(self.peers.len());
        // Who says, by its newer word, that it is fenced (ourselves: what our own word says).
        let mut fenced = HostSet::EMPTY;
        if self.announcing_fence {
            fenced.insert(self.me);
        }
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
            if fenced_epoch.is_some() {
                fenced.insert(*h);
            }
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
        } || (net_settles && self.last_disk_write_ok.is_some_and(|w| now.since(w) < t.peer_timeout_ms));
        let silent_ms = self.last_proof_of_life(now).map_or(0, |l| now.since(l));
        let alone = self.members.len() == 1;

        let survival = if disk_alive.contains(self.me) {
            partition::decide_preferring(self.members, self.preferred, fenced, disk_alive, &reports)
        } else {
            Survival::NoPartition
        };
        // Right after the membership grew, the peers' slots may not list a newcomer yet (they
        // hear it only once they applied its join and its heartbeats reached them): a verdict
        // then is set aside for a peer timeout. Safety does not rest on it: a host without a
        // majority's acknowledgement still loses its lease, and a peer apart from the winner is
        // failed over only once it reports itself fenced (or, dead, after its fence deadline).
        let settling = self.grown_at.is_some_and(|g| now.since(g) < t.peer_timeout_ms);
        let mut fence = None;
        if survival.must_fence(self.me) && !settling {
            let since = *self.losing_since.get_or_insert(now);
            // The winner must also have shown itself alive since the verdict began (a heartbeat
            // or a slot change received after it): a dead host's last word stays fresh for a
            // peer timeout, and a verdict drawn from it alone would hand the cluster to a host
            // that no longer runs. Its slot, landed late or changed after its last heartbeat,
            // said it did not hear us, and we fenced, healthy and connected, a second after it
            // died (the fault suite, two hosts and a network witness). A living winner speaks
            // at every round, so this delays a real loser's fence by a round at most.
            if let Survival::Split { winner } = survival {
                if now.since(since) >= t.partition_confirm_ms && self.spoke_since(winner, since) {
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
