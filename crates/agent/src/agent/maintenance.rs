//! Maintenance by live migration, the coordinator's part: at each tick the leader starts the
//! migrations `tandem_core::evacuation::next_moves` plans — hosts in maintenance emptied, VMs
//! returned home once their host is back in normal mode — towards hosts it hears. The migrations
//! themselves run like an operator's (`agent/migration`). The plan is recomputed from committed
//! state each time, so a new leader or a restarted cluster carries on where it stood.

use super::{lock, Agent};
use tandem_core::evacuation::next_moves;
use tandem_core::liveness::{Assessment, HostLiveness};
use tandem_core::state::{Applied, Command};

impl Agent {
    pub(super) async fn evacuate_and_return(&self, a: &Assessment) {
        let (moves, stuck) = self.consensus.with_state(next_moves);
        // Said once in the timeline per VM and reason.
        lock(&self.coordination).stuck_in_maintenance.retain(|vm, _| stuck.iter().any(|s| s.vm == *vm));
        for s in stuck {
            let why = format!("cannot leave its host in maintenance: {}", s.why);
            let changed = lock(&self.coordination).stuck_in_maintenance.insert(s.vm.clone(), why.clone()).as_ref() != Some(&why);
            if changed {
                self.events.record(crate::events::EventKind::VmWaiting, Some(&s.vm), None, format!("{} {why}", s.vm));
            }
        }
        for m in moves {
            let heard = m.to == self.me || a.peer(m.to).is_some_and(|p| p.liveness == HostLiveness::Alive);
            if !heard {
                continue;
            }
            // Entering maintenance was judged by admission control; its moves are not judged again.
            let cmd = Command::StartMigration { name: m.vm.clone(), to: m.to, force: true, evacuation: m.evacuation };
            match self.submit(cmd).await {
                Ok(Ok(Applied::MigrationStarted { .. } | Applied::Forced { .. })) => {
                    let host = self.host_name(m.to);
                    let what = if m.evacuation { "leaves its host in maintenance" } else { "returns home" };
                    self.events.record(
                        crate::events::EventKind::MigrationStarted,
                        Some(&m.vm),
                        None,
                        format!("{} {what}: live migration to {host} begins", m.vm),
                    );
                }
                Ok(Ok(other)) => tracing::debug!("migration of {}: {other:?}", m.vm),
                Ok(Err(e)) => tracing::debug!("migration of {} refused: {e}", m.vm),
                Err(e) => tracing::warn!("migration of {} not committed: {e}", m.vm),
            }
        }
    }
}
