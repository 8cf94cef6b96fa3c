//! The membership loop: (re)joins this host to the cluster once it is connected again, and gives
//! up an epoch committed state moved past. The decision is `tandem_core::membership`'s.

use super::{lock, Agent};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tandem_core::membership::{self, MembershipStep, MembershipView};
use tandem_core::state::{Applied, Command};

impl Agent {
    pub(super) async fn membership_loop(self: Arc<Self>) {
        let mut ticks = self.ticks.subscribe();
        while !self.stopping.load(Ordering::SeqCst) {
            self.next_tick(&mut ticks).await;
            let st = self.status();
            let assessment = self.assessment();
            let view = MembershipView {
                joined: st.joined_epoch,
                committed: self.consensus.with_state(|s| s.hosts.get(&self.me).map(|h| (h.status, h.epoch))),
                leader_known: self.consensus.status().leader.is_some(),
                stopping: self.is_stopping(),
                fenced: st.fenced,
                assessment: assessment.as_ref(),
            };
            match membership::decide(&view) {
                MembershipStep::Wait => continue,
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
            match self.submit(Command::HostJoined { host: self.me }).await {
                Ok(Ok(Applied::HostEpoch { epoch, .. })) => {
                    {
                        let mut s = lock(&self.status);
                        s.joined_epoch = Some(epoch);
                        s.fenced = None;
                        s.fenced_at = None;
                        s.fenced_in_epoch = None;
                        s.fence_confirmed_at = None;
                    }
                    self.events.record(crate::events::EventKind::Joined, None, Some(&self.cfg.name), format!("joined the cluster in epoch {epoch}"));
                }
                Ok(other) => tracing::warn!("join refused: {other:?}"),
                Err(e) => tracing::debug!("join failed: {e}"),
            }
        }
    }
}
