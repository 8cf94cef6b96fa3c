//! The reconciler loop: makes the VMs running here match what committed state assigns here.
//! What to do is decided by `tandem_core::reconcile` (sans I/O); this module gathers its inputs
//! and executes its actions.

use super::{lock, Agent};
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tandem_core::reconcile::{Action, KillReason, LocalVm, Reconciler, StopCause, View};
use tandem_core::state::{Applied, Command};
use tandem_drivers::VmLaunch;
use tracing::Instrument;

/// What the reconciler keeps between passes: the core's memory (restart budget, generations
/// given up) and the driver calls in flight.
#[derive(Default)]
pub(super) struct Reconciling {
    core: Reconciler,
    starting: BTreeSet<String>,
    stopping: BTreeSet<String>,
}

impl Agent {
    /// The VMs whose start this host's reconciler has under way.
    pub(super) fn starting_here(&self) -> BTreeSet<String> {
        lock(&self.reconciling).starting.clone()
    }

    pub(super) async fn reconcile_loop(self: Arc<Self>) {
        let mut rounds = self.rounds();
        let exits = self.driver.exits().unwrap_or_default();
        while !self.stopping.load(Ordering::SeqCst) {
            tokio::select! {
                () = self.next_round(&mut rounds) => {}
                // A switchover to this host committed: resume now, not at the next tick (the
                // guest is paused until then).
                () = self.reconcile_wake.notified() => {}
                // A VM exited: a crashed one restarts now, not at the next round.
                () = exits.notified() => {}
            }
            self.reconcile().await;
        }
    }

    /// One pass: the decisions are `tandem_core::reconcile`'s; this executes them in order.
    pub(super) async fn reconcile(self: &Arc<Self>) {
        if self.parking.load(Ordering::SeqCst) {
            // A planned stop is shutting the VMs down to park them: their exits are its own.
            return;
        }
        let st = self.status();
        let listed = self.driver.list();
        // QEMU's shutdown reasons, read with the exits (a pass forgets an exited VM before it
        // marks it stopped).
        let reasons: std::collections::BTreeMap<String, String> = listed.iter().filter_map(|v| Some((v.name.clone(), v.shutdown_reason.clone()?))).collect();
        let local: Vec<LocalVm> = listed.into_iter().map(|v| LocalVm { name: v.name, generation: v.generation, exit: v.exit, paused: v.paused }).collect();
        let joined = st.joined_epoch.filter(|_| st.fenced.is_none());
        let may_start = joined.is_some() && self.may_start_vms();
        let snapshot = self.consensus.snapshot();
        let serving = self.serving_pages();
        let actions = {
            let mut r = lock(&self.reconciling);
            let Reconciling { core, stopping, starting } = &mut *r;
            let view = View { me: self.me, joined, state: &snapshot.state, local: &local, stopping, starting, serving: &serving, may_start };
            core.pass(&view, self.clock.now())
        };
        for action in actions {
            self.execute(action, &snapshot.state, &reasons).await;
        }
    }

    async fn execute(self: &Arc<Self>, action: Action, state: &tandem_core::state::ClusterState, reasons: &std::collections::BTreeMap<String, String>) {
        match action {
            Action::Kill { name, reason } => {
                let _ = self.driver.kill(&name);
                if reason == KillReason::NotAssignedHere {
                    self.events.record(
                        crate::events::EventKind::VmKilled,
                        Some(&name),
                        None,
                        format!("{name} runs here but committed state assigns it elsewhere; killed"),
                    );
                }
            }
            Action::Stop { name } => {
                lock(&self.reconciling).stopping.insert(name.clone());
                let a = Arc::clone(self);
                tokio::spawn(
                    async move {
                        if let Err(e) = a.driver.stop(&name).await {
                            tracing::warn!("stop of {name} failed: {e}");
                        }
                        lock(&a.reconciling).stopping.remove(&name);
                    }
                    .in_current_span(),
                );
            }
            Action::Forget { name, exit } => {
                self.driver.forget(&name);
                self.events.record(crate::events::EventKind::VmExited, Some(&name), None, format!("{name} exited: {exit:?}"));
            }
            Action::MarkStopped { name, generation, cause } => {
                match &cause {
                    StopCause::UnprotectedCrash { detail } => self.events.record(
                        crate::events::EventKind::VmCrashed,
                        Some(&name),
                        Some(&self.cfg.name),
                        format!("{name} crashed ({detail}); not protected, so it stays stopped"),
                    ),
                    StopCause::GuestShutdown => {
                        let reason = reasons.get(&name);
                        self.events.record(
                            crate::events::EventKind::VmExited,
                            Some(&name),
                            Some(&self.cfg.name),
                            format!("{name} shut itself down{}; it stays stopped", reason.map(|r| format!(" (QEMU: {r})")).unwrap_or_default()),
                        );
                    }
                }
                // Not committed: the core proposes it again next pass and starts nothing meanwhile.
                match self.submit(Command::StopExited { name: name.clone(), host: self.me, generation }).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::debug!("marking {name} stopped refused: {e}"),
                    Err(e) => tracing::warn!("marking {name} stopped not committed (proposed again next pass): {e}"),
                }
            }
            Action::GiveUp { name, generation, detail } => self.propose_give_up(&name, generation, &detail).await,
            Action::Release { name, generation } => {
                // Not committed: committed state still assigns it here, so the next pass asks again.
                if let Err(e) = self.submit(Command::Release { name: name.clone(), host: self.me, generation }).await {
                    tracing::warn!("release of {name} not committed (asked again next pass): {e}");
                }
            }
            Action::Start { name, generation } => {
                let Some(spec) = state.vms.get(&name).map(|v| v.spec.clone()) else { return };
                self.spawn_start(spec, generation);
            }
            Action::Resume { name, generation } => {
                let Some(spec) = state.vms.get(&name).map(|v| v.spec.clone()) else { return };
                self.spawn_resume(spec, generation);
            }
        }
    }

    /// Runs `work` for VM `name` unless a start or resume of it is already in flight, marking
    /// it in flight meanwhile.
    fn spawn_once<F>(self: &Arc<Self>, name: String, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if !lock(&self.reconciling).starting.insert(name.clone()) {
            return;
        }
        let a = Arc::clone(self);
        tokio::spawn(
            async move {
                work.await;
                lock(&a.reconciling).starting.remove(&name);
            }
            .in_current_span(),
        );
    }

    /// Resumes a paused copy committed state runs here (after a switchover, or an aborted
    /// migration), under the same last-instant check as a start.
    fn spawn_resume(self: &Arc<Self>, spec: tandem_core::state::VmSpec, generation: u64) {
        let (a, name) = (Arc::clone(self), spec.name.clone());
        self.spawn_once(name.clone(), async move {
            let check = a.start_check_as(&spec, generation, super::fencing::StartKind::Resume);
            match a.driver.resume(&name, &check).await {
                Ok(()) => {
                    tracing::debug!("{name}: resumed (generation {generation})");
                    let detail = format!("{name} resumed on {} (generation {generation})", a.cfg.name);
                    a.events.record(crate::events::EventKind::VmResumed, Some(&name), Some(&a.cfg.name), detail);
                    a.spawn_probe(&spec, generation);
                }
                // A copy that cannot resume is of no use: kill it, and the next pass starts the
                // VM afresh from its disk (the budget of local restarts applies).
                Err(e) => {
                    tracing::warn!("resume of {name} failed: {e}; killing the paused copy");
                    let _ = a.driver.kill(&name);
                }
            }
        });
    }

    fn spawn_start(self: &Arc<Self>, spec: tandem_core::state::VmSpec, generation: u64) {
        let (a, name) = (Arc::clone(self), spec.name.clone());
        self.spawn_once(name.clone(), async move {
            if !a.may_start_vms() {
                return;
            }
            // A mirrored disk whose copy here is not current (the VM went on on another site's
            // copy when this site's storage failed): never started from it; given up at once,
            // so the cluster places it where a copy is current.
            if spec.site_mirrored() && !a.consensus.with_state(|s| s.vms.get(&name).is_some_and(|v| s.copy_current_on(v, a.me))) {
                let detail = "its disk's copy at this host's site is not current (it went on on another site's copy)".to_string();
                a.events.record(crate::events::EventKind::VmStartFailed, Some(&name), Some(&a.cfg.name), format!("{name} not started here: {detail}"));
                a.give_up_here(&name, generation, &detail).await;
                return;
            }
            // A mirrored disk: a start again in this generation runs without a mirror until one
            // is attached and in sync, so the other sites' copies are committed stale first.
            if spec.site_mirrored() && !a.leave_copies_behind(&spec.name, generation).await {
                return;
            }
            let check = a.start_check(&spec, generation);
            let launch = VmLaunch { spec, generation, check };
            match a.driver.start(&launch).await {
                Ok(()) => {
                    let detail = format!("{name} started on {} (generation {generation})", a.cfg.name);
                    a.events.record(crate::events::EventKind::VmStarted, Some(&name), Some(&a.cfg.name), detail);
                    a.spawn_probe(&launch.spec, generation);
                }
                Err(e) => {
                    a.events.record(crate::events::EventKind::VmStartFailed, Some(&name), Some(&a.cfg.name), format!("{name} failed to start: {e}"));
                    // Retried on the next pass while the budget lasts, then moved on.
                    let now = a.clock.now();
                    let given_up = {
                        let mut r = lock(&a.reconciling);
                        (!r.core.allow_restart(&name, now)).then(|| r.core.give_up(&name, generation, &e.to_string()))
                    };
                    if let Some(Action::GiveUp { name, generation, detail }) = given_up {
                        a.propose_give_up(&name, generation, &detail).await;
                    }
                }
            }
        });
    }

    /// Proposes that this host gives `name` up at `generation` (the core already recorded it, so
    /// that generation is not started here again whatever becomes of the proposal): the cluster
    /// moves it to another host, or puts it in the error state once it failed on enough of them.
    /// Gives `name` up here at `generation` at once (no retry could help): recorded, so that
    /// generation is not started here again, and proposed.
    pub(super) async fn give_up_here(&self, name: &str, generation: u64, detail: &str) {
        let given_up = lock(&self.reconciling).core.give_up(name, generation, detail);
        if let Action::GiveUp { name, generation, detail } = given_up {
            self.propose_give_up(&name, generation, &detail).await;
        }
    }

    async fn propose_give_up(&self, name: &str, generation: u64, detail: &str) {
        let cmd = Command::VmFailed { name: name.to_string(), host: self.me, generation, detail: detail.to_string() };
        match self.submit(cmd).await {
            Ok(Ok(Applied::Relocating { failed_on, .. })) => self.events.record(
                crate::events::EventKind::VmRelocating,
                Some(name),
                Some(&self.cfg.name),
                format!("{name} gave up on {} ({detail}); failed on {} host(s), placing it elsewhere", self.cfg.name, failed_on.len()),
            ),
            Ok(Ok(Applied::VmInError { error, .. })) => {
                self.events.record(crate::events::EventKind::VmError, Some(name), Some(&self.cfg.name), format!("{name} is in the error state: {error}"));
            }
            Ok(other) => tracing::debug!("giving up {name} here refused: {other:?}"),
            Err(e) => tracing::warn!("giving up {name} here not committed: {e}"),
        }
    }
}
