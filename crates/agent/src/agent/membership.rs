//! The membership loop: (re)joins this host to the cluster once it is connected again, gives up
//! an epoch committed state moved past, and has this host stand for election when openraft's
//! timer would not. The decisions are `tandem_core::membership`'s and `tandem_core::election`'s.

use super::{lock, Agent};
use crate::consensus::{election_timeout_max_ms, election_timeout_min_ms, ConsensusStatus};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tandem_core::election::{ElectionWatch, PeerLog, Stand, StandView};
use tandem_core::liveness::Assessment;
use tandem_core::membership::{self, MembershipStep, MembershipView};
use tandem_core::state::{Applied, Command};
use tandem_core::HostId;

impl Agent {
    pub(super) async fn membership_loop(self: Arc<Self>) {
        let mut rounds = self.rounds();
        let mut elections = ElectionWatch::default();
        while !self.stopping.load(Ordering::SeqCst) {
            self.next_round(&mut rounds).await;
            if self.parking.load(Ordering::SeqCst) {
                // A planned stop is parking this host's VMs: it leaves, and joins again only
                // after its restart.
                self.consensus.set_deferring(false);
                continue;
            }
            let st = self.status();
            if st.joined_epoch.is_some() {
                self.sync_site().await;
            }
            let assessment = self.assessment();
            let raft = self.consensus.status();
            self.steer_elections(&mut elections, &raft, st.fenced.is_some(), assessment.as_ref());
            let view = MembershipView {
                joined: st.joined_epoch,
                committed: self.consensus.with_state(|s| s.hosts.get(&self.me).map(|h| (h.status, h.epoch))),
                leader: raft.leader,
                stopping: self.is_stopping(),
                fenced: st.fenced,
                assessment: assessment.as_ref(),
            };
            match membership::decide(&view) {
                MembershipStep::Wait => {
                    if view.joined.is_none() {
                        tracing::debug!(
                            "not joining: committed {:?}, leader {:?}, fence {:?}, majority {:?}",
                            view.committed,
                            raft.leader,
                            view.assessment.map(|a| a.fence),
                            view.assessment.map(|a| a.has_majority)
                        );
                    }
                    continue;
                }
                MembershipStep::EpochLost { status, epoch, joined } => {
                    // Unjoined first, so no start passes its last-instant check, then the kill.
                    lock(&self.status).joined_epoch = None;
                    let killed = self.driver.kill_all();
                    self.events.record(
                        crate::events::EventKind::EpochLost,
                        None,
                        Some(&self.cfg.name),
                        format!("committed state has this host {status:?} in epoch {epoch}, joined in {joined}; killed {killed} VM(s)"),
                    );
                    continue;
                }
                MembershipStep::Join => {}
            }
            let before = self.consensus.with_state(|s| s.hosts.get(&self.me).map_or(0, |h| h.epoch));
            match self.submit(Command::HostJoined { host: self.me }).await {
                Ok(Ok(applied @ (Applied::HostEpoch { epoch, .. } | Applied::Rejoined { epoch, .. }))) if self.take_join(epoch) => {
                    let back = match applied {
                        Applied::Rejoined { back, elsewhere, .. } => format!(
                            "; {} VM(s) parked with its planned stop start here again{}",
                            back.len(),
                            if elsewhere.is_empty() { String::new() } else { format!(", {} wait for another host", elsewhere.len()) }
                        ),
                        _ => String::new(),
                    };
                    self.events.record(crate::events::EventKind::Joined, None, Some(&self.cfg.name), format!("joined the cluster in epoch {epoch}{back}"));
                    self.end_shutdown_maintenance().await;
                }
                Ok(Ok(Applied::HostEpoch { epoch, .. } | Applied::Rejoined { epoch, .. })) => {
                    // A coordinator may already be moving this host's VMs in that epoch on its
                    // word: give the join up and join again, in a later epoch.
                    tracing::warn!("joined in epoch {epoch}, which this host promised never to run VMs in; joining again");
                    self.gave_up_join(epoch);
                }
                Ok(other) => tracing::warn!("join refused: {other:?}"),
                Err(e) => {
                    // Undecided: it may still commit, in at most the next epoch. Counted so that a
                    // fence, announced through it, lets the coordinator move this host's VMs
                    // even if it did.
                    tracing::debug!("join failed: {e}");
                    let unanswered = lock(&self.status).unanswered_join_epoch;
                    self.gave_up_join(before.max(unanswered) + 1);
                }
            }
        }
    }

    /// Has this host stand for election, or its timer defer, as `tandem_core::election` decides.
    fn steer_elections(&self, elections: &mut ElectionWatch, raft: &ConsensusStatus, own_fenced: bool, assessment: Option<&Assessment>) {
        let Some(a) = assessment else {
            self.consensus.set_deferring(false);
            return;
        };
        let peer_logs: Vec<PeerLog> = self
            .consensus
            .peer_logs()
            .into_iter()
            .filter_map(|(n, last_log, exchange)| Some(PeerLog { host: HostId(u32::try_from(n).ok()?), last_log, exchange }))
            .collect();
        let step = elections.step(&StandView {
            me: self.me,
            leader: raft.leader.and_then(|l| u32::try_from(l).ok()).map(HostId),
            term: raft.term,
            last_log: self.consensus.last_log_position(),
            peer_logs: &peer_logs,
            own_fenced,
            assessment: a,
            election_timeout_min_ms: election_timeout_min_ms(&self.cfg.timings),
            election_timeout_max_ms: election_timeout_max_ms(&self.cfg.timings),
        });
        self.consensus.set_deferring(step.defer);
        match step.stand {
            Some(Stand::AgainstFencedLeader(leader)) => {
                tracing::info!("the leader ({leader}) reports itself fenced: standing for election");
                self.consensus.stand_for_election();
            }
            Some(Stand::Leaderless) => {
                tracing::info!("no leader known for a while: standing for election");
                self.consensus.stand_for_election();
            }
            None => {}
        }
    }

    /// Tells committed state the site this host's configuration names, if it says otherwise
    /// (a new host, or a configuration changed across a restart). Asked again next round if it
    /// does not commit.
    async fn sync_site(&self) {
        let committed = self.consensus.with_state(|s| s.hosts.get(&self.me).map(|h| h.site.clone()));
        if committed.is_none_or(|site| site == self.cfg.site) {
            return;
        }
        match self.submit(Command::SetHostSite { host: self.me, site: self.cfg.site.clone() }).await {
            Ok(Ok(_)) => {
                let detail = match &self.cfg.site {
                    Some(site) => format!("{} is in site {site}", self.cfg.name),
                    None => format!("{} is in no site", self.cfg.name),
                };
                self.events.record(crate::events::EventKind::HostSite, None, Some(&self.cfg.name), detail);
            }
            Ok(Err(e)) => tracing::warn!("this host's site refused: {e}"),
            Err(e) => tracing::debug!("this host's site not committed yet: {e}"),
        }
    }

    /// Takes a join answered with `epoch` — joined, unfenced — if the epoch is past this host's
    /// promise; checked and done under the promise's gate, so the promise cannot rise between.
    fn take_join(&self, epoch: u64) -> bool {
        let _gate = lock(&self.promise_gate);
        if epoch <= self.promised_through() {
            return false;
        }
        let mut s = lock(&self.status);
        s.joined_epoch = Some(epoch);
        s.fenced = None;
        s.fenced_at = None;
        s.fenced_through = None;
        s.fence_confirmed_at = None;
        drop(s);
        // A leader again sends heartbeats (see `Agent::fence`).
        self.consensus.send_heartbeats(true);
        true
    }

    /// Records that committed state may have this host in `epoch` through a join it did not
    /// take, and extends a fence to cover it (promised before it is announced).
    fn gave_up_join(&self, epoch: u64) {
        let announced = {
            let mut s = lock(&self.status);
            s.unanswered_join_epoch = s.unanswered_join_epoch.max(epoch);
            if s.fenced.is_some() {
                s.fenced_through = Some(s.fenced_through.unwrap_or(0).max(epoch));
            }
            // An unconfirmed fence is promised when it is confirmed (`confirm_fence`).
            s.fenced_through.filter(|_| s.fence_confirmed_at.is_some())
        };
        if let Some(through) = announced {
            if let Err(e) = self.promise_through(through) {
                tracing::error!("could not store the fence promise through epoch {through}: {e}");
            }
        }
    }
}
