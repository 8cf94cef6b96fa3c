//! The membership loop: (re)joins this host to the cluster once it is connected again.

use super::{lock, Agent};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tandem_core::liveness::FenceReason;
use tandem_core::state::{Applied, Command, HostStatus};

impl Agent {
    pub(super) async fn membership_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !self.stopping.load(Ordering::SeqCst) {
            tick.tick().await;
            let st = self.status();
            let known = self.consensus.with_state(|s| s.hosts.get(&self.me).map(|h| (h.status, h.epoch)));
            // Committed state may say we were failed over or rejoined elsewhere: then we no
            // longer hold the epoch we joined in, and must stop everything and join again.
            if let (Some(joined), Some((status, epoch))) = (st.joined_epoch, known) {
                if status != HostStatus::Active || epoch != joined {
                    // Unjoined first, so no start passes its last-instant check, then the kill.
                    lock(&self.status).joined_epoch = None;
                    let killed = self.driver.kill_all();
                    self.events.record(
                        "epoch-lost",
                        None,
                        Some(&self.cfg.name),
                        format!("committed state has this host {status:?} in epoch {epoch}, joined in {joined}; killed {killed} VM(s)"),
                    );
                }
                continue;
            }
            if st.joined_epoch.is_some() || known.is_none() || self.consensus.status().leader.is_none() {
                continue;
            }
            // A host that is stopping, or whose consensus stopped, never joins again.
            if self.is_stopping() || matches!(st.fenced, Some(FenceReason::Stopping | FenceReason::ConsensusStopped)) {
                continue;
            }
            let Some(a) = self.assessment() else { continue };
            if a.fence.is_some() || !a.has_majority {
                continue;
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
                    self.events.record("joined", None, Some(&self.cfg.name), format!("joined the cluster in epoch {epoch}"));
                }
                Ok(other) => tracing::warn!("join refused: {other:?}"),
                Err(e) => tracing::debug!("join failed: {e}"),
            }
        }
    }
}
