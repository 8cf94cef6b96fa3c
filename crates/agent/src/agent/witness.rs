//! The disk witness loop: each round it reads the claim blocks, asks
//! `tandem_core::witness::next_step` what to do, and does it — writes this host's claim, opens
//! or closes the witness's Raft node here, points the route at the holder. On the leader it
//! also keeps the witness a voter exactly while the cluster has two hosts, and commits that
//! (`set-witness`), so FTT and what-if count its vote.
//!
//! Fencing closes the region first (`DiskWitness::close_now`: every later write of the node is
//! refused), before it kills the VMs; the loop then stops the node and withdraws the claim. So
//! a host that lost the right to speak for the cluster writes nothing more to the witness before
//! its fence deadline, which is when the other host may take it over.

use super::{lock, Agent};
use crate::consensus::witness::WitnessRoute;
use crate::consensus::Consensus;
use crate::events::EventKind;
use crate::witness::{read_claims, write_claim, RegionError, WitnessRegion, CLAIM_IO_TIMEOUT};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_core::state::Command;
use tandem_core::witness::{leader_heard, next_step, steer_election, Claim, ElectionStep, ElectionView, WitnessLead, WitnessStep, WitnessView, WITNESS_NODE};
use tandem_core::HostId;

/// The address the witness has in Raft's membership: a name, not a host's address; the route
/// says where it answers.
pub const WITNESS_ADDR: &str = "disk-witness";
/// How long the leader waits for the witness to catch up as a learner before it counts as a
/// voter (it is retried at a later round).
const ADD_VOTER_TIMEOUT: Duration = Duration::from_secs(10);

/// The witness's node while this host holds it.
pub struct HeldWitness {
    pub consensus: Consensus,
    closed: Arc<AtomicBool>,
    /// When it was opened here (the agent's clock, ms): a node just opened refuses every vote
    /// for its leader lease.
    opened_at: u64,
}

/// This host's side of the disk witness.
pub struct DiskWitness {
    region: Arc<dyn WitnessRegion>,
    pub(crate) route: WitnessRoute,
    me: HostId,
    incarnation: u64,
    counter: AtomicU64,
    held: Mutex<Option<Arc<HeldWitness>>>,
    /// The write gate of the node held here or being opened: a fence shuts it (see
    /// [`DiskWitness::close_now`]).
    gate: Mutex<Option<Arc<AtomicBool>>>,
    /// Claim I/O runs on the blocking pool, or inline (a simulator: one runtime, no threads).
    blocking_pool: bool,
    /// Since when (the agent's clock, ms) the witness's node here has led, as last seen.
    leading_since: Mutex<Option<u64>>,
    /// When this host last stood for election, holding the witness, with no leader known.
    stood_leaderless: Mutex<Option<u64>>,
    /// Set when the agent halts as on a crash: the loop ends without writing anything more.
    halted: AtomicBool,
}

impl DiskWitness {
    #[must_use]
    pub fn new(region: Arc<dyn WitnessRegion>, me: HostId, incarnation: u64, blocking_pool: bool) -> DiskWitness {
        DiskWitness {
            region,
            route: WitnessRoute::default(),
            me,
            incarnation,
            counter: AtomicU64::new(0),
            held: Mutex::new(None),
            gate: Mutex::new(None),
            blocking_pool,
            leading_since: Mutex::new(None),
            stood_leaderless: Mutex::new(None),
            halted: AtomicBool::new(false),
        }
    }

    /// The witness's node, if this host holds it.
    #[must_use]
    pub fn held(&self) -> Option<Arc<HeldWitness>> {
        lock(&self.held).clone()
    }

    /// Refuses every further write of the node held here or being opened, at once (no await).
    /// A fence calls it after it marked this host fenced and before it kills the VMs; an open
    /// installs its gate before it checks that mark, so one of the two always sees the other.
    pub fn close_now(&self) {
        if let Some(g) = lock(&self.gate).as_ref() {
            g.store(true, Ordering::SeqCst);
        }
    }

    /// Stops everything at once, as a crash would: the gate shut, the node stopped, the loop
    /// ended without another write (a simulated host may be running again, with a new agent,
    /// before this one's loop would have noticed: its late claim withdrawal once erased the new
    /// agent's claim and let the peer open the witness too — simulator seed 81).
    pub async fn halt(&self) {
        self.halted.store(true, Ordering::SeqCst);
        self.close_now();
        let held = lock(&self.held).take();
        if let Some(h) = held {
            h.closed.store(true, Ordering::SeqCst);
            h.consensus.shutdown().await;
        }
    }

    /// Whether the node held here must be closed: shut by a fence, or stopped because its
    /// storage failed (a write the region refused or did not answer stops openraft's core for
    /// good; closed, the node is opened afresh from the region once it answers — a network
    /// witness restarted, a disk path back).
    fn shut(&self) -> bool {
        self.held().is_some_and(|h| h.closed.load(Ordering::SeqCst) || h.consensus.fatal().is_some())
    }

    fn claim(&self, claiming: bool) -> Claim {
        Claim { host: self.me, claiming, incarnation: self.incarnation, counter: self.counter.fetch_add(1, Ordering::SeqCst) + 1 }
    }
}

/// Runs one blocking region operation off the runtime, within [`CLAIM_IO_TIMEOUT`] (inline
/// without a blocking pool: the simulator's region never blocks).
async fn region_io<T: Send + 'static>(pool: bool, f: impl FnOnce() -> Result<T, RegionError> + Send + 'static) -> Result<T, RegionError> {
    if !pool {
        return f();
    }
    match tokio::time::timeout(CLAIM_IO_TIMEOUT, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(RegionError::Io(std::io::Error::other(join.to_string()))),
        Err(_) => Err(RegionError::Timeout(CLAIM_IO_TIMEOUT)),
    }
}

impl Agent {
    pub(super) async fn witness_loop(self: Arc<Self>) {
        let mut rounds = self.rounds();
        let mut last_error: Option<String> = None;
        let mut reach = WitnessReach::default();
        while !self.is_stopping() && !self.witness.as_ref().is_some_and(|w| w.halted.load(Ordering::SeqCst)) {
            // A claim just written is read back at once (a read after the write, as the
            // protocol needs), so a takeover opens the witness in one round, not two.
            let mut outcome = self.witness_round().await;
            if matches!(outcome, Ok(WitnessStep::Claim)) {
                outcome = self.witness_round().await;
            }
            if let Err(e) = outcome {
                let text = crate::api::chain(&e);
                if last_error.as_ref() != Some(&text) {
                    tracing::warn!("disk witness: {text}");
                }
                if reach.failed() {
                    let detail = format!("the witness's region does not answer ({text}); the hosts go on, without a third vote until it does");
                    self.events.record(crate::events::EventKind::WitnessUnreachable, None, Some(&self.cfg.name), detail);
                }
                last_error = Some(text);
            } else {
                if reach.answered() {
                    self.events.record(crate::events::EventKind::WitnessReachable, None, Some(&self.cfg.name), "the witness's region answers again");
                }
                last_error = None;
            }
            if let Err(e) = self.keep_witness_vote().await {
                tracing::debug!("disk witness vote: {e}");
            }
            self.steer_witness_elections();
            self.next_round(&mut rounds).await;
        }
        if let Some(w) = self.witness.as_ref().filter(|w| !w.halted.load(Ordering::SeqCst)) {
            w.close_now();
            self.close_witness(w).await;
        }
    }

    /// Reads the claims, decides, acts; the step taken.
    async fn witness_round(self: &Arc<Self>) -> Result<WitnessStep, RegionError> {
        let Some(w) = &self.witness else { return Ok(WitnessStep::Wait) };
        let (region, key) = (Arc::clone(&w.region), self.key.clone());
        let claims = region_io(w.blocking_pool, move || read_claims(region.as_ref(), &key)).await;
        let Some(assessment) = self.assessment() else { return Ok(WitnessStep::Wait) };
        // Whether this host may speak for the witness: it holds its lease and has no reason to
        // fence. Not whether it is joined: a host fenced earlier and not yet back in (it joins
        // only through a leader, which may need the witness's vote) must be able to take the
        // witness over when its peer dies (simulator seed 95).
        // And only while the cluster has at most two hosts: beyond, the witness votes no more
        // (the leader removes it), and a node running for nothing would only cost disk I/O.
        let needed = self.consensus.with_state(|s| s.hosts.len()) <= 2;
        let may_hold = needed && !w.shut() && assessment.fence.is_none() && self.may_speak_for_witness();
        let read = claims.as_ref().ok().map(Vec::as_slice);
        let view = WitnessView { me: self.me, holding: w.held().is_some(), may_hold, claims: read, assessment: &assessment };
        let step = next_step(&view);
        self.route_witness(w, read, &assessment);
        match step {
            WitnessStep::Wait => {}
            WitnessStep::Claim | WitnessStep::Withdraw if w.halted.load(Ordering::SeqCst) => {}
            WitnessStep::Claim | WitnessStep::Withdraw => {
                let (region, key, claim) = (Arc::clone(&w.region), self.key.clone(), w.claim(step == WitnessStep::Claim));
                region_io(w.blocking_pool, move || write_claim(region.as_ref(), &key, &claim)).await?;
            }
            WitnessStep::Open => self.open_witness(w).await,
            WitnessStep::Close => self.close_witness(w).await,
        }
        claims.map(|_| step)
    }

    /// Opens the witness's node here.
    async fn open_witness(self: &Arc<Self>, w: &DiskWitness) {
        let closed = Arc::new(AtomicBool::new(false));
        *lock(&w.gate) = Some(Arc::clone(&closed));
        // Checked again with the gate in place: a fence from now on shuts it, and one before
        // ended the lease (or stops the agent).
        if !self.may_speak_for_witness() || w.halted.load(Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        let lease: crate::witness::LeaseCheck = Arc::new(move || weak.upgrade().is_some_and(|a| a.holds_lease()));
        let opened = Consensus::open_witness(
            Arc::clone(&w.region),
            Arc::clone(&closed),
            lease,
            self.token.clone(),
            Arc::clone(&self.rpc),
            w.route.clone(),
            &self.cfg.timings,
        )
        .await;
        match opened {
            Ok(consensus) if w.halted.load(Ordering::SeqCst) => consensus.shutdown().await,
            Ok(mut consensus) => {
                consensus.use_heavy(Arc::clone(&self.heavy));
                *lock(&w.held) = Some(Arc::new(HeldWitness { consensus, closed, opened_at: self.clock.now().0 }));
                w.route.set(Some(self.cfg.api_addr.to_string()));
                self.events.record(EventKind::WitnessHeld, None, Some(&self.cfg.name), format!("{} holds the disk witness", self.cfg.name));
                // A host that took the witness over usually has no leader (its peer is gone):
                // it stands now rather than at its next election timeout, up to 1.8 s away.
                if self.consensus.status().leader.is_none() {
                    self.consensus.stand_for_election();
                }
            }
            Err(e) => tracing::warn!("disk witness: cannot open its node here: {}", crate::api::chain(&e)),
        }
    }

    /// Stops the witness's node here (its writes refused first), then withdraws the claim.
    async fn close_witness(&self, w: &DiskWitness) {
        let held = lock(&w.held).take();
        if let Some(h) = held {
            h.closed.store(true, Ordering::SeqCst);
            h.consensus.shutdown().await;
            self.events.record(EventKind::WitnessReleased, None, Some(&self.cfg.name), format!("{} let the disk witness go", self.cfg.name));
        }
        let (region, key, claim) = (Arc::clone(&w.region), self.key.clone(), w.claim(false));
        if let Err(e) = region_io(w.blocking_pool, move || write_claim(region.as_ref(), &key, &claim)).await {
            tracing::warn!("disk witness: claim not withdrawn ({e}); it lapses at this host's fence deadline");
        }
    }

    /// Points the route at the holder: this host, or the lowest live claimer (which holds it
    /// or is about to).
    fn route_witness(&self, w: &DiskWitness, claims: Option<&[Claim]>, a: &tandem_core::liveness::Assessment) {
        if w.held().is_some() {
            return w.route.set(Some(self.cfg.api_addr.to_string()));
        }
        let Some(claims) = claims else { return };
        let holder = claims
            .iter()
            .filter(|c| c.claiming && c.host != self.me)
            .filter(|c| !a.peer(c.host).is_some_and(|p| p.liveness == tandem_core::liveness::HostLiveness::Dead))
            .map(|c| c.host)
            .min_by_key(|h| h.0);
        let addr = holder.and_then(|h| self.consensus.with_state(|s| s.hosts.get(&h).map(|r| r.api_addr.clone())));
        w.route.set(addr);
    }

    /// On the leader: the witness is a voter exactly while the cluster has two hosts, and
    /// committed state says whether it is.
    async fn keep_witness_vote(&self) -> Result<(), crate::consensus::ConsensusError> {
        let Some(w) = &self.witness else { return Ok(()) };
        if !self.consensus.is_leader() {
            return Ok(());
        }
        let voters = self.consensus.status().voters;
        let is_voter = voters.contains(&WITNESS_NODE);
        let (hosts, committed) = self.consensus.with_state(|s| (s.hosts.len(), s.disk_witness));
        let wanted = hosts == 2;
        if wanted && !is_voter && w.route.holder_addr().is_some() {
            tokio::time::timeout(ADD_VOTER_TIMEOUT, self.consensus.add_voter(WITNESS_NODE, WITNESS_ADDR))
                .await
                .map_err(|_| crate::consensus::ConsensusError::Undecided(ADD_VOTER_TIMEOUT))??;
            self.events.record(EventKind::WitnessVoter, None, None, "the disk witness votes: two hosts and the witness, one failure tolerated");
        } else if !wanted && is_voter {
            self.consensus.remove_voter(WITNESS_NODE).await?;
            self.events.record(EventKind::WitnessVoter, None, None, format!("the disk witness no longer votes: {hosts} hosts"));
        }
        let is_voter = self.consensus.status().voters.contains(&WITNESS_NODE);
        if is_voter != committed {
            if let (Err(e), _) = self.consensus.propose(Command::SetWitness { disk: is_voter }).await? {
                tracing::warn!("disk witness vote not committed: {e}");
            }
        }
        Ok(())
    }

    /// The witness's elections, which it never starts by itself: `steer_election` decides
    /// who stands, from both nodes' logs as a voter ranks them.
    fn steer_witness_elections(&self) {
        let Some(w) = &self.witness else { return };
        let Some(held) = w.held() else { return };
        let (witness, own) = (held.consensus.status(), self.consensus.status());
        let now = self.clock.now().0;
        let witness_leads = witness.leader == Some(WITNESS_NODE);
        let since = {
            let mut s = lock(&w.leading_since);
            *s = if witness_leads { Some(s.unwrap_or(now)) } else { None };
            *s
        };
        // While the witness's leader lease is fresh it refuses any vote: stand after it.
        let lease_over = since.is_some_and(|t| now.saturating_sub(t) > 2 * crate::consensus::raft_heartbeat_ms(&self.cfg.timings));
        let witness_lead = match (witness_leads, lease_over) {
            (false, _) => WitnessLead::No,
            (true, false) => WitnessLead::LeaseFresh,
            (true, true) => WitnessLead::LeasePassed,
        };
        let stood_lately = lock(&w.stood_leaderless).is_some_and(|t| now.saturating_sub(t) < crate::consensus::election_timeout_min_ms(&self.cfg.timings));
        let Some(assessment) = self.assessment() else { return };
        let view = ElectionView {
            host_knows_leader: leader_heard(own.leader, self.me, &assessment),
            witness_lead,
            host_log: self.consensus.last_log_position(),
            witness_log: held.consensus.last_log_position(),
            host_may_stand: now.saturating_sub(held.opened_at) > 2 * crate::consensus::raft_heartbeat_ms(&self.cfg.timings) && !stood_lately,
        };
        match steer_election(&view) {
            ElectionStep::Nothing => {}
            ElectionStep::HostStands => {
                tracing::info!("disk witness leads; this host caught up and stands for election");
                self.consensus.stand_for_election();
            }
            ElectionStep::HostStandsLeaderless => {
                tracing::info!("no leader, and this host's log is as up to date as the disk witness's: it stands for election");
                *lock(&w.stood_leaderless) = Some(now);
                self.consensus.stand_for_election();
            }
            ElectionStep::WitnessStands => {
                tracing::info!(
                    "no leader, and the disk witness's log ({:?}) is more up to date than this host's ({:?}): the witness stands for election",
                    view.witness_log,
                    view.host_log
                );
                held.consensus.stand_for_election();
            }
        }
    }

    /// This host holds its liveness lease (not on a losing side, proof of life fresh), its
    /// state is whole and it is not stopping.
    fn may_speak_for_witness(&self) -> bool {
        self.holds_lease() && self.consensus.state_intact() && !self.is_stopping()
    }

    /// The disk witness's node, if this host holds it.
    #[must_use]
    pub fn held_witness(&self) -> Option<Arc<HeldWitness>> {
        self.witness.as_ref().and_then(DiskWitness::held)
    }

    /// The first step of a fence: the witness's node here writes nothing more.
    pub(super) fn close_witness_now(&self) {
        if let Some(w) = &self.witness {
            w.close_now();
        }
    }
}

/// Rounds in a row that failed before the witness counts as unreachable (one lost request is
/// not worth a warning).
pub const WITNESS_UNREACHABLE_ROUNDS: u32 = 3;

/// Whether the witness's region answers this host, as the rounds tell it: edges only.
#[derive(Default)]
struct WitnessReach {
    failed_rounds: u32,
    warned: bool,
}

impl WitnessReach {
    /// A failed round; true when this one makes it unreachable.
    fn failed(&mut self) -> bool {
        self.failed_rounds = self.failed_rounds.saturating_add(1);
        let now = self.failed_rounds >= WITNESS_UNREACHABLE_ROUNDS && !self.warned;
        self.warned |= now;
        now
    }

    /// A round that answered; true when it ends an unreachable spell.
    fn answered(&mut self) -> bool {
        let was = self.warned;
        *self = WitnessReach::default();
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warning only after enough failed rounds in a row, once per spell; a round that answers
    /// ends the spell (and is worth saying only if it was warned of) and starts the count again.
    #[test]
    fn the_witness_counts_as_unreachable_only_after_rounds_in_a_row_and_says_it_once() {
        let mut r = WitnessReach::default();
        for _ in 1..WITNESS_UNREACHABLE_ROUNDS {
            assert!(!r.failed(), "warned before {WITNESS_UNREACHABLE_ROUNDS} rounds in a row");
        }
        assert!(!r.answered(), "a spell never warned of is not worth a 'reachable'");
        for _ in 1..WITNESS_UNREACHABLE_ROUNDS {
            assert!(!r.failed());
        }
        assert!(r.failed(), "the round that makes it unreachable warns");
        assert!(!r.failed() && !r.failed(), "once per spell");
        assert!(r.answered(), "the end of a warned spell is said");
        assert!(!r.answered());
        assert!(!r.failed(), "counted afresh after an answer");
    }
}
