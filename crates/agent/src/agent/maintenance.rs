//! Maintenance by live migration, the coordinator's part: at each tick the leader starts the
//! migrations `tandem_core::evacuation::next_moves` plans — hosts in maintenance emptied, VMs
//! returned home once their host is back in normal mode — towards hosts it hears. The migrations
//! themselves run like an operator's (`agent/migration`). The plan is recomputed from committed
//! state each time, so a new leader or a restarted cluster carries on where it stood. A VM
//! whose evacuation or move back home keeps failing is given up after a bounded number of
//! attempts (`tandem_core::evacuation::EvacuationAttempts`) and reported as stuck.

use super::{lock, Agent};
use tandem_core::evacuation::next_moves_except;
use tandem_core::liveness::{Assessment, HostLiveness};
use tandem_core::state::{Applied, VmPhase};

impl Agent {
    pub(super) async fn evacuate_and_return(&self, a: &Assessment) {
        let given_up = {
            let mut c = lock(&self.coordination);
            self.consensus.with_state(|s| c.evacuation_attempts.observe(s));
            c.evacuation_attempts.given_up()
        };
        let (moves, stuck) = self.consensus.with_state(|s| next_moves_except(s, &given_up));
        // Said once in the timeline per VM and reason.
        lock(&self.coordination).stuck_in_maintenance.retain(|vm, _| stuck.iter().any(|s| s.vm == *vm));
        for s in stuck {
            let changed = lock(&self.coordination).stuck_in_maintenance.insert(s.vm.clone(), s.why.clone()).as_ref() != Some(&s.why);
            if changed {
                self.events.record(crate::events::EventKind::VmWaiting, Some(&s.vm), None, format!("{} {}", s.vm, s.why));
            }
        }
        for m in moves {
            let heard = m.to == self.me || a.peer(m.to).is_some_and(|p| p.liveness == HostLiveness::Alive);
            if !heard {
                continue;
            }
            // Entering maintenance was judged by admission control; its moves are not judged again.
            let cmd = self.consensus.with_state(|s| m.command(s));
            match self.submit(cmd).await {
                Ok(Ok(applied @ (Applied::MigrationStarted { .. } | Applied::Forced { .. }))) => {
                    self.count_evacuation_attempt(&m.vm, &applied);
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

    /// The VMs whose evacuation (or move back home) this coordinator gave up on, with the
    /// attempts that failed.
    pub(crate) fn evacuations_given_up(&self) -> std::collections::BTreeMap<String, u32> {
        lock(&self.coordination).evacuation_attempts.given_up()
    }

    /// Remembers the maintenance move of `vm` that `applied` began (its destination generation, from
    /// the answer or else from committed state), so that its outcome counts.
    fn count_evacuation_attempt(&self, vm: &str, applied: &Applied) {
        let generation = match applied {
            Applied::MigrationStarted { to, .. } => Some(to.generation),
            _ => self.consensus.with_state(|s| match s.vms.get(vm).map(|v| &v.phase) {
                Some(VmPhase::Migrating { to, .. }) => Some(to.generation),
                _ => None,
            }),
        };
        if let Some(g) = generation {
            lock(&self.coordination).evacuation_attempts.started(vm, g);
        }
    }
}
