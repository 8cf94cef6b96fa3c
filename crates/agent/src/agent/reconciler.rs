//! The reconciler loop: makes the VMs running here match what committed state assigns here.

use super::{lock, Agent, MAX_LOCAL_RESTARTS, RESTART_WINDOW_MS};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tandem_core::state::{Applied, Command, HostStatus, PowerState, Protection};
use tandem_core::Millis;
use tandem_drivers::{VmExit, VmLaunch};
use tracing::Instrument;

/// What the reconciler keeps between passes.
#[derive(Default)]
pub(super) struct Reconciling {
    starting: BTreeSet<String>,
    stopping: BTreeSet<String>,
    restarts: BTreeMap<String, VecDeque<Millis>>,
    /// VMs (and the generation) this host gave up on: never started again here in that
    /// generation, even while the local copy of committed state still lags the release.
    given_up: BTreeMap<String, (u64, String)>,
}

impl Agent {
    pub(super) async fn reconcile_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !self.stopping.load(Ordering::SeqCst) {
            tick.tick().await;
            self.reconcile().await;
        }
    }

    pub(super) async fn reconcile(self: &Arc<Self>) {
        let st = self.status();
        let running: Vec<tandem_drivers::VmStatus> = self.driver.list();
        let live: Vec<&tandem_drivers::VmStatus> = running.iter().filter(|v| v.exit.is_none()).collect();
        let Some(joined) = st.joined_epoch.filter(|_| st.fenced.is_none()) else {
            // Not joined, or fenced: nothing may run here.
            for v in &live {
                let _ = self.driver.kill(&v.name);
            }
            return;
        };
        let (active, wanted, to_release, specs, held) = self.consensus.with_state(|s| {
            let active = s.hosts.get(&self.me).is_some_and(|h| h.status == HostStatus::Active && h.epoch == joined);
            let mut wanted: BTreeMap<String, u64> = BTreeMap::new();
            let mut to_release = Vec::new();
            let mut specs = BTreeMap::new();
            let mut held = BTreeSet::new();
            for vm in s.assigned_to(self.me) {
                let Some(a) = vm.assignment else { continue };
                match vm.desired {
                    PowerState::Running => {
                        wanted.insert(vm.spec.name.clone(), a.generation);
                        specs.insert(vm.spec.name.clone(), vm.spec.clone());
                        if vm.held {
                            held.insert(vm.spec.name.clone());
                        }
                    }
                    PowerState::Stopped => to_release.push((vm.spec.name.clone(), a.generation)),
                }
            }
            (active, wanted, to_release, specs, held)
        });
        if !active {
            for v in &live {
                let _ = self.driver.kill(&v.name);
            }
            return;
        }
        // Running here but not wanted here (at this generation): stop gracefully when it was
        // stopped by an operator and is still ours, kill otherwise.
        for v in &live {
            if wanted.get(&v.name) == Some(&v.generation) {
                continue;
            }
            if to_release.iter().any(|(n, g)| *n == v.name && *g == v.generation) {
                let newly = lock(&self.reconciling).stopping.insert(v.name.clone());
                if newly {
                    let a = Arc::clone(self);
                    let name = v.name.clone();
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
            } else {
                let _ = self.driver.kill(&v.name);
                self.events.record("vm-killed", Some(&v.name), None, format!("{} runs here but committed state assigns it elsewhere; killed", v.name));
            }
        }
        let retry_give_up: Vec<(String, u64, String)> = {
            let mut scratch = lock(&self.reconciling);
            scratch.given_up.retain(|name, (generation, _)| wanted.get(name) == Some(generation));
            scratch.given_up.iter().map(|(n, (g, d))| (n.clone(), *g, d.clone())).collect()
        };
        // Still ours after giving up: the release was not committed (or is not applied here
        // yet); ask again rather than leave the VM stuck on a host that will not start it.
        for (name, generation, detail) in &retry_give_up {
            self.give_up_here(name, *generation, detail).await;
        }
        // Exits. A VM whose exit stops it is not started again below, even while this host's
        // copy of committed state has not applied the stop yet.
        let mut stopped_now: BTreeSet<String> = BTreeSet::new();
        for v in running.iter().filter(|v| v.exit.is_some()) {
            let exit = v.exit.clone().unwrap_or(VmExit::StoppedByAgent);
            self.driver.forget(&v.name);
            self.events.record("vm-exited", Some(&v.name), None, format!("{} exited: {exit:?}", v.name));
            if wanted.get(&v.name) != Some(&v.generation) {
                continue;
            }
            let protection = specs.get(&v.name).map(|s| s.protection);
            match exit {
                // A guest that powered itself off stays off: HA must not fight the operator.
                VmExit::GuestShutdown => {
                    stopped_now.insert(v.name.clone());
                    let _ = self.submit(Command::SetPower { name: v.name.clone(), desired: PowerState::Stopped, force: false }).await;
                }
                VmExit::StoppedByAgent => {}
                // Only `protect` VMs are restarted after a crash on a live host; best-effort ones
                // are restarted only when their host fails.
                VmExit::Crashed { detail } if protection != Some(Protection::Protect) => {
                    stopped_now.insert(v.name.clone());
                    let _ = self.submit(Command::SetPower { name: v.name.clone(), desired: PowerState::Stopped, force: false }).await;
                    self.events.record(
                        "vm-crashed",
                        Some(&v.name),
                        Some(&self.cfg.name),
                        format!("{} crashed ({detail}); not protected, so it stays stopped", v.name),
                    );
                }
                // Restarted here while the budget lasts (the start below), then moved on.
                VmExit::Crashed { detail } => {
                    if !self.allow_restart(&v.name) {
                        self.give_up_here(
                            &v.name,
                            v.generation,
                            &format!("crashed {MAX_LOCAL_RESTARTS} times within {} s: {detail}", RESTART_WINDOW_MS / 1000),
                        )
                        .await;
                    }
                }
            }
        }
        // Released once stopped.
        let live_names: BTreeSet<&str> = live.iter().map(|v| v.name.as_str()).collect();
        for (name, generation) in to_release {
            if !live_names.contains(name.as_str()) && !lock(&self.reconciling).stopping.contains(&name) {
                let _ = self.submit(Command::Release { name, host: self.me, generation }).await;
            }
        }
        // Wanted but not running: start, if we hold the lease.
        if !self.may_start_vms() {
            return;
        }
        for (name, generation) in wanted {
            // Held: a lower restart group is still starting.
            if live_names.contains(name.as_str())
                || held.contains(&name)
                || stopped_now.contains(&name)
                || lock(&self.reconciling).given_up.get(&name).is_some_and(|(g, _)| *g == generation)
            {
                continue;
            }
            let Some(spec) = specs.get(&name).cloned() else { continue };
            if !lock(&self.reconciling).starting.insert(name.clone()) {
                continue;
            }
            let a = Arc::clone(self);
            tokio::spawn(
                async move {
                    if !a.may_start_vms() {
                        lock(&a.reconciling).starting.remove(&name);
                        return;
                    }
                    let check = a.start_check(&spec, generation);
                    let launch = VmLaunch { spec, generation, check };
                    match a.driver.start(&launch).await {
                        Ok(()) => {
                            a.events.record("vm-started", Some(&name), Some(&a.cfg.name), format!("{name} started on {} (generation {generation})", a.cfg.name))
                        }
                        Err(e) => {
                            a.events.record("vm-start-failed", Some(&name), Some(&a.cfg.name), format!("{name} failed to start: {e}"));
                            // Retried on the next pass while the budget lasts, then moved on.
                            if !a.allow_restart(&name) {
                                a.give_up_here(&name, generation, &e.to_string()).await;
                            }
                        }
                    }
                    lock(&a.reconciling).starting.remove(&name);
                }
                .in_current_span(),
            );
        }
    }

    /// This host has spent its restart budget on `name`: the cluster moves it to another host,
    /// or puts it in the error state once it has failed on enough of them.
    pub(super) async fn give_up_here(&self, name: &str, generation: u64, detail: &str) {
        {
            let mut scratch = lock(&self.reconciling);
            scratch.restarts.remove(name);
            // Whatever the outcome of the submit (a timeout may still commit), this generation
            // is not started here again: another host may be given it at any moment.
            scratch.given_up.insert(name.to_string(), (generation, detail.to_string()));
        }
        let cmd = Command::VmFailed { name: name.to_string(), host: self.me, generation, detail: detail.to_string() };
        match self.submit(cmd).await {
            Ok(Ok(Applied::Relocating { failed_on, .. })) => self.events.record(
                "vm-relocating",
                Some(name),
                Some(&self.cfg.name),
                format!("{name} gave up on {} ({detail}); failed on {} host(s), placing it elsewhere", self.cfg.name, failed_on.len()),
            ),
            Ok(Ok(Applied::VmInError { error, .. })) => {
                self.events.record("vm-error", Some(name), Some(&self.cfg.name), format!("{name} is in the error state: {error}"));
            }
            Ok(other) => tracing::debug!("giving up {name} here refused: {other:?}"),
            Err(e) => tracing::warn!("giving up {name} here not committed: {e}"),
        }
    }

    /// Counts a local (re)start attempt of a failing VM; false once the budget is spent.
    pub(super) fn allow_restart(&self, name: &str) -> bool {
        let now = self.clock.now();
        let mut s = lock(&self.reconciling);
        let q = s.restarts.entry(name.to_string()).or_default();
        while q.front().is_some_and(|t| now.since(*t) > RESTART_WINDOW_MS) {
            q.pop_front();
        }
        if q.len() >= MAX_LOCAL_RESTARTS {
            return false;
        }
        q.push_back(now);
        true
    }
}
