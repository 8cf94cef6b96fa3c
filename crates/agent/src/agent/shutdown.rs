//! A planned stop of the agent (SIGTERM, `systemctl stop`) under `[shutdown] policy`:
//! `migrate` first puts this host in maintenance and waits, bounded by `evacuate_timeout_s`, for
//! its VMs to leave live (the coordinator's evacuation), then stops as `kill` does — fence, kill
//! what is left, announce — so peers restart only what could not move. The host remembers that
//! it entered maintenance for the stop (`data_dir/left-for-shutdown`) and, once it has joined
//! again after its restart, leaves maintenance: its VMs come back home.

use super::Agent;
use serde::Deserialize;
use std::time::Duration;
use tandem_core::state::{Command, HostMode};

/// The marker of a maintenance this host entered for its own stop.
pub const SHUTDOWN_MARK: &str = "left-for-shutdown";
/// How often the stop looks whether the host is empty.
const EVACUATION_POLL: Duration = Duration::from_millis(200);

/// What a planned stop does with the host's VMs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShutdownPolicy {
    /// Kill them at once; peers restart them (a few seconds down).
    #[default]
    Kill,
    /// Move them away live first (maintenance), then kill what could not move.
    Migrate,
}

/// `[shutdown]` in the agent's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub policy: ShutdownPolicy,
    /// How long a `migrate` stop waits for the host to empty, seconds.
    pub evacuate_timeout_s: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { policy: ShutdownPolicy::Kill, evacuate_timeout_s: 300 }
    }
}

impl Agent {
    /// Under the `migrate` policy: maintenance, then wait (bounded) until no VM is assigned here
    /// or migrating away. Returns how many are still here.
    pub(super) async fn evacuate_for_stop(&self) -> usize {
        let here = || self.consensus.with_state(|s| s.assigned_to(self.me).count());
        if self.cfg.shutdown.policy != ShutdownPolicy::Migrate || self.status().joined_epoch.is_none() || here() == 0 {
            return here();
        }
        let others = self.consensus.with_state(|s| s.active_hosts().iter().filter(|h| *h != self.me).count());
        if others == 0 {
            return here();
        }
        let _ = std::fs::write(self.cfg.data_dir.join(SHUTDOWN_MARK), b"maintenance entered for a planned stop\n");
        match self.submit(Command::SetHostMode { host: self.me, mode: HostMode::Maintenance, force: true }).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("stopping: maintenance refused ({e}); the VMs are killed instead"),
            Err(e) => tracing::warn!("stopping: maintenance not committed ({e}); the VMs are killed instead"),
        }
        self.events.record(
            crate::events::EventKind::AgentStopping,
            None,
            Some(&self.cfg.name),
            format!("asked to stop: moving {} VM(s) away live first (shutdown policy migrate)", here()),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.cfg.shutdown.evacuate_timeout_s);
        while tokio::time::Instant::now() < deadline && !self.is_fenced() {
            let (left, leaving) = self.consensus.with_state(|s| (s.assigned_to(self.me).count(), s.migrations().any(|(_, f, _)| f.host == self.me)));
            if left == 0 && !leaving {
                break;
            }
            tokio::time::sleep(EVACUATION_POLL).await;
        }
        here()
    }

    /// After a join: leaves a maintenance this host entered for its own stop.
    pub(super) async fn end_shutdown_maintenance(&self) {
        let mark = self.cfg.data_dir.join(SHUTDOWN_MARK);
        if !mark.exists() {
            return;
        }
        match self.submit(Command::SetHostMode { host: self.me, mode: HostMode::Normal, force: true }).await {
            Ok(Ok(_)) => {
                let _ = std::fs::remove_file(&mark);
                self.events.record(
                    crate::events::EventKind::Joined,
                    None,
                    Some(&self.cfg.name),
                    "back from a planned stop: out of maintenance, its VMs come back".to_string(),
                );
            }
            other => tracing::warn!("leaving the maintenance of the planned stop: {other:?} (tried again at the next join)"),
        }
    }
}
