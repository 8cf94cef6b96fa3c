//! Fencing and the start gate: how this host gives its VMs up (when it must fence, and when it
//! is asked to stop), and the check a driver runs at the instant it creates a VM's process.
//! Both sides take the driver's table lock (`kill_all` on one side, the process creation on the
//! other), so a start either sees the fence or is killed by it.

use super::{lock, Agent};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::liveness::FenceReason;
use tandem_core::state::{HostStatus, VmPhase};
use tandem_core::Millis;

impl Agent {
    /// A deliberate stop (SIGTERM, `systemctl stop`) that never leaves VMs unprotected: under
    /// `[shutdown] policy = "migrate"` the VMs first leave live (`agent/shutdown`); then this
    /// host fences itself — no start passes its check from then on — and kills every VM left;
    /// then it waits, bounded by `kill_grace_ms` plus a few heartbeats, until every exit is
    /// confirmed and the fence is announced — in the slot, and acknowledged by every peer that
    /// hears us ([`Agent::fence_announced`]) — so peers restart the VMs at once instead of
    /// waiting out a fence deadline; only then do the loops stop.
    pub async fn stop_gracefully(&self) {
        self.stop_with(None).await;
    }

    /// [`Agent::stop_gracefully`] under `policy` (`None`: the cluster's, else this host's). Under `shutdown`
    /// and `freeze` the VMs are shut down cleanly and parked (`agent/shutdown`); if the leave
    /// cannot be committed, the stop goes on as `kill` does.
    pub async fn stop_with(&self, policy: Option<super::shutdown::ShutdownPolicy>) {
        let policy = policy.unwrap_or_else(|| self.default_stop_policy());
        if policy.parks() && self.park_for_stop(policy).await {
            self.stop();
            return;
        }
        if policy == super::shutdown::ShutdownPolicy::Migrate {
            self.evacuate_for_stop().await;
        }
        let now = self.clock.now();
        let running = self.driver.list().iter().filter(|v| v.exit.is_none()).count();
        tracing::warn!("stopping: killing {running} VM(s) on this host; peers restart them");
        self.events.record(
            crate::events::EventKind::AgentStopping,
            None,
            Some(&self.cfg.name),
            format!("asked to stop: killing {running} VM(s) so that peers restart them"),
        );
        if !self.is_fenced() {
            self.fence(FenceReason::Stopping, now);
        } else {
            self.driver.kill_all();
        }
        let t = &self.cfg.timings;
        // A leader is its own coordinator: it stays until its own failover is committed (the
        // others would first have to elect a new leader).
        let leading = self.consensus.is_leader();
        let bound = Duration::from_millis(t.kill_grace_ms + 3 * t.heartbeat_interval_ms + if leading { 3000 } else { 0 });
        let announced = async {
            // Confirmed exits, then the announcement in the slot and heard by the peers. (Two
            // heartbeat intervals were once taken as enough: with calm rounds spaced further
            // apart the slot still said "not fenced" when the host went quiet, and once its last
            // heartbeat aged out the peers waited for the fence deadline.)
            while lock(&self.status).fence_confirmed_at.is_none() {
                self.confirm_fence(self.clock.now());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            while !self.fence_announced() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            while leading && self.consensus.with_state(|s| s.hosts.get(&self.me).is_some_and(|h| h.status == HostStatus::Active)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(bound, announced).await.is_err() {
            tracing::error!("stopping: not every VM exit was confirmed within {bound:?}; peers will wait out the fence deadline");
        }
        self.stop();
    }

    /// Whether this host may start a VM right now: joined in the epoch committed state has for
    /// it, not fenced, and holding its liveness lease at this instant. Checked when reconciling
    /// and again just before each start, because a pause can fall between the two.
    pub(super) fn may_start_vms(&self) -> bool {
        let st = self.status();
        // A state machine that panicked mid-apply (a bug an assertion in `apply` caught) left
        // its state half-changed: nothing starts on it; the next liveness tick fences.
        st.fenced.is_none() && st.joined_epoch.is_some() && !self.parking.load(Ordering::SeqCst) && self.holds_lease() && self.consensus.state_intact()
    }

    /// Whether this host holds its liveness lease now (see `Liveness::lease_valid`).
    pub(super) fn holds_lease(&self) -> bool {
        if self.mutation == Some(crate::io::Mutation::SkipLeaseCheck) {
            return true;
        }
        lock(&self.liveness).lease_valid(self.clock.now())
    }

    /// The check a driver runs at the instant it creates VM `name`'s process (under the lock
    /// that fencing's kill takes): it reads status, committed state and the lease afresh, so a
    /// start decided from a snapshot taken before a fence, a failover or a rejoin is refused.
    pub(super) fn start_check(self: &Arc<Self>, spec: &tandem_core::state::VmSpec, generation: u64) -> tandem_drivers::StartCheck {
        self.start_check_as(spec, generation, StartKind::Fresh)
    }

    /// [`Agent::start_check`] for one kind of start: what committed state must say differs.
    pub(super) fn start_check_as(self: &Arc<Self>, spec: &tandem_core::state::VmSpec, generation: u64, kind: StartKind) -> tandem_drivers::StartCheck {
        let a = Arc::downgrade(self);
        let spec = spec.clone();
        Arc::new(move || {
            let name = &spec.name;
            let a = a.upgrade().ok_or("the agent is gone")?;
            // This host's own policy first: no API role can widen it.
            a.cfg.policy.admits(&spec).map_err(|e| format!("refused by this host's policy: {e}"))?;
            let st = a.status();
            if let Some(reason) = st.fenced {
                return Err(format!("this host fenced itself ({reason})"));
            }
            let joined = st.joined_epoch.ok_or("this host has not joined the cluster")?;
            if !a.consensus.state_intact() {
                return Err("the committed state was left half-applied by a failed apply".to_string());
            }
            let committed = a.consensus.with_state(|s| {
                let host = s.hosts.get(&a.me).map(|h| (h.status, h.epoch));
                let vm = s.vms.get(name).map(|v| v.phase.clone());
                (host, vm)
            });
            match committed {
                (Some((HostStatus::Active, epoch)), _) if epoch != joined => {
                    return Err(format!("committed state has this host in epoch {epoch}, it joined in {joined}"))
                }
                (Some((HostStatus::Active, _)), Some(phase)) if kind.admits(&phase, a.me, generation) => {}
                (Some((HostStatus::Active, _)), vm) => {
                    return Err(format!("committed state no longer runs {name} here at generation {generation} (now {vm:?})"))
                }
                (host, _) => return Err(format!("committed state has this host {host:?}")),
            }
            if !a.holds_lease() {
                return Err("this host's liveness lease has lapsed".into());
            }
            Ok(())
        })
    }
}

/// What a start is, for its last-instant check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StartKind {
    /// A VM booted here: committed state places it here (or it is migrating away from here and
    /// crashed meanwhile: the source may restart it, the destination cannot resume without a
    /// switchover that only a completed migration proposes).
    Fresh,
    /// A live migration's paused destination: committed state migrates it here.
    Incoming,
    /// A paused copy's vCPUs started: committed state places it here and no migration runs.
    Resume,
}

impl StartKind {
    fn admits(self, phase: &VmPhase, me: tandem_core::HostId, generation: u64) -> bool {
        let here = |a: &tandem_core::state::Assignment| a.host == me && a.generation == generation;
        match (self, phase) {
            (StartKind::Fresh | StartKind::Resume, VmPhase::Placed { at }) | (StartKind::Fresh, VmPhase::Migrating { at, .. }) => here(at),
            (StartKind::Incoming, VmPhase::Migrating { to, .. }) => here(to),
            _ => false,
        }
    }
}

impl Agent {
    /// Fences this host: marks it fenced (so no start passes its last-instant check from now
    /// on), then kills every VM. The fence is announced once every exit is confirmed
    /// ([`Agent::confirm_fence`]).
    pub(super) fn fence(&self, reason: FenceReason, now: Millis) {
        {
            let mut st = lock(&self.status);
            st.fenced = Some(reason);
            st.fenced_at = Some(now);
            st.fenced_through = st.joined_epoch.map(|e| e.max(st.unanswered_join_epoch));
            st.fence_confirmed_at = None;
            st.joined_epoch = None;
        }
        // After the flag, before the kill: the disk witness's node here writes nothing more.
        self.close_witness_now();
        // A fenced host that leads stops sending heartbeats until it joins again, so the
        // others elect a leader: one whose answers are lost (a one-way cut) would otherwise keep
        // them following it while it can commit nothing (simulator, two hosts, one-way cut).
        self.consensus.send_heartbeats(false);
        // After the flag: a start racing this either sees the flag or is in the driver's table
        // when kill_all takes it. Nothing before the kill may wait on a lock that a slow
        // `apply` holds (the watchdog thread fences through here when the runtime stalls).
        let killed = self.driver.kill_all();
        // An unjoined host announces its fence for the epoch committed state has for it.
        let unjoined = lock(&self.status).fenced_through.is_none();
        let committed = if unjoined { self.consensus.with_state(|s| s.hosts.get(&self.me).map(|h| h.epoch)) } else { None };
        {
            let mut st = lock(&self.status);
            st.kills_on_fence = killed;
            if st.fenced_through.is_none() {
                st.fenced_through = committed.map(|e| e.max(st.unanswered_join_epoch));
            }
        }
        self.events.record(crate::events::EventKind::Fenced, None, Some(&self.cfg.name), format!("self-fenced: {reason}; killed {killed} VM(s)"));
        self.confirm_fence(now);
    }

    /// Marks the fence confirmed once the driver reports every VM exited (reaped), so that the
    /// fence is announced only when it is true.
    pub(super) fn confirm_fence(&self, now: Millis) {
        let pending = {
            let st = lock(&self.status);
            st.fenced.is_some() && st.fence_confirmed_at.is_none()
        };
        if !pending || self.driver.list().iter().any(|v| v.exit.is_none()) {
            return;
        }
        // Promised (durably) before it is announced; tried again at the next tick if the data
        // directory refuses the write.
        if let Some(through) = lock(&self.status).fenced_through {
            if let Err(e) = self.promise_through(through) {
                tracing::error!("fence not announced yet: {e}");
                return;
            }
        }
        let fenced_at = {
            let mut st = lock(&self.status);
            st.fence_confirmed_at = Some(now);
            st.fenced_at.unwrap_or(now)
        };
        self.events.record(
            crate::events::EventKind::FenceConfirmed,
            None,
            Some(&self.cfg.name),
            format!("every VM exit confirmed {} ms after the fence", now.since(fenced_at)),
        );
    }

    /// Promises, durably, never to run VMs in `epoch` or any before it again: the promise only
    /// rises, is stored in `data_dir` before anyone is told, and holds across restarts (the
    /// membership loop gives up a join answered with an epoch not past it).
    pub(super) fn promise_through(&self, epoch: u64) -> std::io::Result<()> {
        let _gate = lock(&self.promise_gate);
        if epoch <= self.promised_through.load(Ordering::SeqCst) {
            return Ok(());
        }
        super::store_number(&self.cfg.data_dir, PROMISE_FILE, epoch)?;
        self.promised_through.fetch_max(epoch, Ordering::SeqCst);
        Ok(())
    }

    /// The epoch through which this host has promised to run no VM.
    pub(super) fn promised_through(&self) -> u64 {
        self.promised_through.load(Ordering::SeqCst)
    }
}

/// Where [`Agent::promise_through`] keeps its promise, in `data_dir`.
pub(super) const PROMISE_FILE: &str = "fenced-through";
