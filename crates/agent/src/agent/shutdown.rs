//! A planned stop of the agent (SIGTERM, `systemctl stop`, `tandem host shutdown`) under a
//! policy (`[shutdown] policy`, or the one the operator named):
//! - `kill`: fence, kill every VM, announce — peers restart them at once.
//! - `migrate`: first puts this host in maintenance and waits, bounded by
//!   `evacuate_timeout_s`, for its VMs to leave live (the coordinator's evacuation), then stops
//!   as `kill` does, so peers restart only what could not move. The host remembers that it
//!   entered maintenance for the stop (`data_dir/left-for-shutdown`) and, once it has joined
//!   again after its restart, leaves maintenance: its VMs come back home.
//! - `shutdown` and `freeze`: every VM is shut down cleanly (ACPI power button for QEMU guests,
//!   SIGTERM for processes; killed after the driver's own timeout), then the host commits that
//!   it leaves (`HostLeave`): nobody fails it over, and its VMs are parked — started again here
//!   when it rejoins, or, under `shutdown`, elsewhere once `restart_elsewhere_after_s` passed
//!   without it (`freeze`: never on their own).

use super::Agent;
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tandem_core::state::{Applied, Command, HostMode};
use tracing::Instrument;

/// The marker of a maintenance this host entered for its own stop.
pub const SHUTDOWN_MARK: &str = "left-for-shutdown";
/// How often the stop looks whether the host is empty.
const EVACUATION_POLL: Duration = Duration::from_millis(200);

pub use tandem_core::state::ShutdownPolicy;

/// `[shutdown]` in the agent's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub policy: ShutdownPolicy,
    /// How long a `migrate` stop waits for the host to empty, seconds.
    pub evacuate_timeout_s: u64,
    /// Under `shutdown`: how long the parked VMs wait for this host before they run elsewhere,
    /// seconds (0: at once).
    pub restart_elsewhere_after_s: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { policy: ShutdownPolicy::Kill, evacuate_timeout_s: 300, restart_elsewhere_after_s: DEFAULT_RESTART_ELSEWHERE_AFTER_S }
    }
}

/// The default of `[shutdown] restart_elsewhere_after_s`.
pub const DEFAULT_RESTART_ELSEWHERE_AFTER_S: u64 = 600;
/// How long one VM's clean shutdown may take beyond the driver's own stop bound before it is
/// killed (the driver's stop already ends in a kill; this bounds a driver that hangs).
pub const PARK_STOP_MARGIN: Duration = Duration::from_secs(5);

impl Agent {
    /// Under the `migrate` policy: maintenance, then wait (bounded) until no VM is assigned here
    /// or migrating away. Returns how many are still here.
    pub(super) async fn evacuate_for_stop(&self) -> usize {
        let here = || self.consensus.with_state(|s| s.assigned_to(self.me).count());
        if self.status().joined_epoch.is_none() || here() == 0 {
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

    /// Under `shutdown` and `freeze`: shuts every VM here down cleanly, then commits the leave
    /// that parks them. Returns whether the leave committed (otherwise the caller stops as
    /// `kill` does: peers then restart what was here).
    pub(super) async fn park_for_stop(&self, policy: ShutdownPolicy) -> bool {
        let Some(epoch) = self.status().joined_epoch.filter(|_| !self.is_fenced()) else { return false };
        if self.consensus.with_state(|s| s.migrations().any(|(_, from, to)| from.host == self.me || to.host == self.me)) {
            tracing::warn!("stopping: a live migration involves this host; its VMs are killed instead of parked");
            return false;
        }
        self.parking.store(true, Ordering::SeqCst);
        let running: Vec<String> = self.driver.list().into_iter().filter(|v| v.exit.is_none()).map(|v| v.name).collect();
        self.events.record(
            crate::events::EventKind::AgentStopping,
            None,
            Some(&self.cfg.name),
            format!("asked to stop (policy {}): shutting {} VM(s) down cleanly, then leaving", policy_name(policy), running.len()),
        );
        let bound =
            Duration::from_secs(self.cfg.qemu.stop_timeout_s) + tandem_drivers::qemu::QUIT_WAIT + tandem_drivers::launcher::KILL_WAIT + PARK_STOP_MARGIN;
        let mut stops = tokio::task::JoinSet::new();
        for name in running {
            let driver = std::sync::Arc::clone(&self.driver);
            stops.spawn(
                async move {
                    if tokio::time::timeout(bound, driver.stop(&name)).await.is_err() {
                        let _ = driver.kill(&name);
                    }
                }
                .in_current_span(),
            );
        }
        while stops.join_next().await.is_some() {}
        let hold_ms = match policy {
            ShutdownPolicy::Shutdown => Some(self.cfg.shutdown.restart_elsewhere_after_s.saturating_mul(1000)),
            _ => None,
        };
        match self.submit(Command::HostLeave { host: self.me, epoch, hold_ms }).await {
            Ok(Ok(Applied::HostLeft { parked, .. })) => {
                let when = hold_ms.map_or_else(|| "when it returns".to_string(), |ms| format!("when it returns, or elsewhere after {} s", ms / 1000));
                self.events.record(
                    crate::events::EventKind::HostLeft,
                    None,
                    Some(&self.cfg.name),
                    format!("left for a planned stop (policy {}): {} VM(s) shut down and parked, back {when}", policy_name(policy), parked.len()),
                );
                true
            }
            other => {
                // `parking` stays set: nothing starts again here before the kill path's fence.
                tracing::warn!("stopping: the leave was not committed ({other:?}); peers restart the VMs instead");
                false
            }
        }
    }

    /// The policy of a planned stop asked without one: the cluster's, else this host's own.
    pub fn default_stop_policy(&self) -> ShutdownPolicy {
        self.consensus.with_state(|s| s.settings.shutdown_policy).unwrap_or(self.cfg.shutdown.policy)
    }

    /// Asks this agent for a planned stop under `policy` (`tandem host shutdown`); the binary's
    /// main task carries it out ([`Agent::stop_requested`]) and exits.
    pub fn request_stop(&self, policy: ShutdownPolicy) {
        self.stop_request.send_replace(Some(policy));
    }

    /// Waits until a planned stop is asked over the API; its policy.
    pub async fn stop_requested(&self) -> ShutdownPolicy {
        let mut rx = self.stop_request.subscribe();
        loop {
            if let Some(p) = *rx.borrow_and_update() {
                return p;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
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

/// The policy as the configuration spells it.
#[must_use]
pub fn policy_name(p: ShutdownPolicy) -> &'static str {
    match p {
        ShutdownPolicy::Kill => "kill",
        ShutdownPolicy::Migrate => "migrate",
        ShutdownPolicy::Shutdown => "shutdown",
        ShutdownPolicy::Freeze => "freeze",
    }
}
