//! The reconciler's decisions, sans I/O: from committed state, what runs on this host now and
//! whether this host may start VMs, which VMs to kill, stop, forget, mark stopped, release, give
//! up on or start — as a list of actions the agent executes in order. It also keeps the local
//! restart budget and the generations given up here, the two things it remembers between passes.
//!
//! The agent gathers the inputs (the driver's list, its status and lease, a snapshot of committed
//! state) and executes the actions (driver calls, proposals, events); every decision is here.

use crate::hostset::HostId;
use crate::state::{ClusterState, HostStatus, PowerState, Protection};
use crate::time::Millis;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Restarts of one crashed VM allowed on this host within [`RESTART_WINDOW_MS`].
pub const MAX_LOCAL_RESTARTS: usize = 3;
/// The window of the local restart budget.
pub const RESTART_WINDOW_MS: u64 = 60_000;

/// How a VM process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum VmExit {
    /// The guest powered itself off (QMP SHUTDOWN with guest=true, or a clean exit of a process).
    GuestShutdown,
    /// We stopped or killed it.
    StoppedByAgent,
    /// It died on its own: crash, signal, guest panic.
    Crashed { detail: String },
}

/// One VM process the driver knows on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalVm {
    pub name: String,
    pub generation: u64,
    /// `None` while it runs.
    pub exit: Option<VmExit>,
    /// Alive with its vCPUs stopped by a live migration: a destination's copy waiting for the
    /// switchover, or a source whose migration completed (which resumes only if it is aborted).
    pub paused: bool,
}

/// What one pass decides from.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub me: HostId,
    /// The epoch this host joined in, if it is joined and not fenced.
    pub joined: Option<u64>,
    pub state: &'a ClusterState,
    pub local: &'a [LocalVm],
    /// VMs whose graceful stop is in flight.
    pub stopping: &'a BTreeSet<String>,
    /// VMs whose start is in flight.
    pub starting: &'a BTreeSet<String>,
    /// VMs whose copy here, spent by a switch to post-copy, still sends the destination the
    /// pages it lacks: not killed for running elsewhere (the guest would lose those pages); the
    /// migration kills it after the last one.
    pub serving: &'a BTreeSet<String>,
    /// Whether this host may start VMs now: joined, not fenced, holding its lease.
    pub may_start: bool,
}

/// Why a running VM is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KillReason {
    /// This host is not joined, or has fenced itself: nothing may run here.
    NotJoined,
    /// Committed state does not have this host active in the epoch it joined in.
    NotActive,
    /// Committed state assigns the VM elsewhere, or here at another generation.
    NotAssignedHere,
}

/// Why a VM is proposed stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The guest powered itself off: HA must not fight it.
    GuestShutdown,
    /// It crashed and is not `protect`: only a host failure restarts it.
    UnprotectedCrash { detail: String },
}

/// One thing the agent does, in the order given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Kill {
        name: String,
        reason: KillReason,
    },
    /// A graceful stop of a VM an operator stopped that is still assigned here.
    Stop {
        name: String,
    },
    /// The driver's record of an exited VM is dropped (the exit is recorded in the timeline).
    Forget {
        name: String,
        exit: VmExit,
    },
    /// Propose `StopExited`: stopped, if still assigned here in `generation`.
    MarkStopped {
        name: String,
        generation: u64,
        cause: StopCause,
    },
    /// Propose `VmFailed`: this host gives the VM up (again, until the release is applied).
    GiveUp {
        name: String,
        generation: u64,
        detail: String,
    },
    /// Propose `Release` of a stopped VM.
    Release {
        name: String,
        generation: u64,
    },
    Start {
        name: String,
        generation: u64,
    },
    /// Resume the vCPUs of a paused copy that committed state assigns here, no longer migrating:
    /// a destination after the switchover, or a source whose migration was aborted.
    Resume {
        name: String,
        generation: u64,
    },
}

/// What the reconciler remembers between passes.
#[derive(Clone, Debug, Default)]
pub struct Reconciler {
    restarts: BTreeMap<String, VecDeque<Millis>>,
    /// VMs (and the generation) this host gave up on: never started again here in that
    /// generation, even while the local copy of committed state still lags the release.
    given_up: BTreeMap<String, (u64, String)>,
    /// VMs whose exit stopped them (guest shutdown, unprotected crash), with the generation: not
    /// started again here, and proposed stopped again every pass, until committed state says
    /// so — a proposal that failed must not let the next pass restart a guest that shut down.
    exit_stopped: BTreeMap<String, (u64, StopCause)>,
}

/// What committed state wants of this host.
struct Wanted {
    active: bool,
    running: BTreeMap<String, (u64, Protection, bool)>,
    to_release: Vec<(String, u64)>,
    /// VMs migrating away from here (their copy here must not be resumed while they do).
    leaving: BTreeSet<String>,
    /// VMs migrating here, with the generation of the paused copy this host may hold.
    arriving: BTreeMap<String, u64>,
}

fn wanted(v: &View<'_>, joined: u64) -> Wanted {
    let s = v.state;
    let active = s.hosts.get(&v.me).is_some_and(|h| h.status == HostStatus::Active && h.epoch == joined);
    let mut running = BTreeMap::new();
    let mut to_release = Vec::new();
    let mut leaving = BTreeSet::new();
    let mut arriving = BTreeMap::new();
    for (name, from, to) in s.migrations() {
        if from.host == v.me {
            leaving.insert(name.to_string());
        }
        if to.host == v.me {
            arriving.insert(name.to_string(), to.generation);
        }
    }
    for vm in s.assigned_to(v.me) {
        let Some(a) = vm.assignment() else { continue };
        match vm.desired() {
            PowerState::Running => {
                running.insert(vm.spec.name.clone(), (a.generation, vm.spec.protection, vm.held()));
            }
            PowerState::Stopped => to_release.push((vm.spec.name.clone(), a.generation)),
        }
    }
    Wanted { active, running, to_release, leaving, arriving }
}

impl Reconciler {
    /// One pass: every action, in the order the agent executes them.
    pub fn pass(&mut self, v: &View<'_>, now: Millis) -> Vec<Action> {
        let live: Vec<&LocalVm> = v.local.iter().filter(|l| l.exit.is_none()).collect();
        let kill_all = |reason| live.iter().map(|l| Action::Kill { name: l.name.clone(), reason }).collect();
        let Some(joined) = v.joined else {
            return kill_all(KillReason::NotJoined);
        };
        let w = wanted(v, joined);
        if !w.active {
            return kill_all(KillReason::NotActive);
        }
        let wants = |name: &str, generation: u64| w.running.get(name).is_some_and(|(g, _, _)| *g == generation);
        let arriving = |name: &str, generation: u64| w.arriving.get(name) == Some(&generation);
        let mut out = Vec::new();
        // Running here but not wanted here at this generation: stop gracefully when an operator
        // stopped it and it is still ours, kill otherwise.
        for l in &live {
            if wants(&l.name, l.generation) || arriving(&l.name, l.generation) || v.serving.contains(&l.name) {
                continue;
            }
            if w.to_release.iter().any(|(n, g)| *n == l.name && *g == l.generation) {
                if !v.stopping.contains(&l.name) {
                    out.push(Action::Stop { name: l.name.clone() });
                }
            } else {
                out.push(Action::Kill { name: l.name.clone(), reason: KillReason::NotAssignedHere });
            }
        }
        // Still ours after giving up: the release was not committed (or is not applied here
        // yet); ask again rather than leave the VM stuck on a host that will not start it.
        self.given_up.retain(|name, (g, _)| wants(name, *g));
        out.extend(self.given_up.iter().map(|(n, (g, d))| Action::GiveUp { name: n.clone(), generation: *g, detail: d.clone() }));
        self.exit_stopped.retain(|name, (g, _)| wants(name, *g));
        out.extend(self.exit_stopped.iter().map(|(n, (g, cause))| Action::MarkStopped { name: n.clone(), generation: *g, cause: cause.clone() }));
        self.exits(v, &w, now, &mut out);
        // Released once stopped.
        let live_names: BTreeSet<&str> = live.iter().map(|l| l.name.as_str()).collect();
        for (name, generation) in &w.to_release {
            if !live_names.contains(name.as_str()) && !v.stopping.contains(name) {
                out.push(Action::Release { name: name.clone(), generation: *generation });
            }
        }
        if !v.may_start {
            return out;
        }
        // A paused copy wanted here and no longer migrating runs on: the switchover committed
        // (destination) or the migration was aborted (source). Never while the VM migrates.
        for l in live.iter().filter(|l| l.paused && wants(&l.name, l.generation) && !w.leaving.contains(&l.name)) {
            out.push(Action::Resume { name: l.name.clone(), generation: l.generation });
        }
        // Wanted but not running: start (a held VM waits for a lower restart group).
        for (name, (generation, _, held)) in &w.running {
            // A VM migrating away is not started here again (a driver that moves it by a stop and
            // a start has stopped it): the migration's end decides where it runs.
            let skip = *held
                || w.leaving.contains(name)
                || live_names.contains(name.as_str())
                || self.exit_stopped.get(name).is_some_and(|(g, _)| g == generation)
                || v.starting.contains(name)
                || self.given_up.get(name).is_some_and(|(g, _)| g == generation);
            if !skip {
                out.push(Action::Start { name: name.clone(), generation: *generation });
            }
        }
        out
    }

    /// Exits: each is forgotten; one of a VM still wanted here decides what follows. A VM whose
    /// exit stops it is remembered in `exit_stopped` (not started again before the stop applies).
    fn exits(&mut self, v: &View<'_>, w: &Wanted, now: Millis, out: &mut Vec<Action>) {
        for l in v.local {
            let Some(exit) = l.exit.clone() else { continue };
            out.push(Action::Forget { name: l.name.clone(), exit: exit.clone() });
            let Some((_, protection, _)) = w.running.get(&l.name).filter(|(g, _, _)| *g == l.generation) else { continue };
            match exit {
                VmExit::GuestShutdown => out.push(self.exit_stops(l, StopCause::GuestShutdown)),
                VmExit::StoppedByAgent => {}
                VmExit::Crashed { detail } if *protection != Protection::Protect => {
                    out.push(self.exit_stops(l, StopCause::UnprotectedCrash { detail }));
                }
                // Restarted here while the budget lasts (a start below), then given up.
                VmExit::Crashed { detail } => {
                    if !self.allow_restart(&l.name, now) {
                        let detail = format!("crashed {MAX_LOCAL_RESTARTS} times within {} s: {detail}", RESTART_WINDOW_MS / 1000);
                        out.push(self.give_up(&l.name, l.generation, &detail));
                    }
                }
            }
        }
    }

    fn exit_stops(&mut self, l: &LocalVm, cause: StopCause) -> Action {
        self.exit_stopped.insert(l.name.clone(), (l.generation, cause.clone()));
        Action::MarkStopped { name: l.name.clone(), generation: l.generation, cause }
    }

    /// Counts a local (re)start attempt of a failing VM; false once the budget is spent.
    pub fn allow_restart(&mut self, name: &str, now: Millis) -> bool {
        let q = self.restarts.entry(name.to_string()).or_default();
        while q.front().is_some_and(|t| now.since(*t) > RESTART_WINDOW_MS) {
            q.pop_front();
        }
        if q.len() >= MAX_LOCAL_RESTARTS {
            return false;
        }
        q.push_back(now);
        true
    }

    /// This host gives `name` up at `generation`: whatever becomes of the proposal (a timeout
    /// may still commit), that generation is never started here again.
    pub fn give_up(&mut self, name: &str, generation: u64, detail: &str) -> Action {
        self.restarts.remove(name);
        self.given_up.insert(name.to_string(), (generation, detail.to_string()));
        Action::GiveUp { name: name.to_string(), generation, detail: detail.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cluster, process_vm, run_on};
    use crate::state::Command;

    fn running(name: &str, generation: u64) -> LocalVm {
        LocalVm { name: name.into(), generation, exit: None, paused: false }
    }

    fn paused(name: &str, generation: u64) -> LocalVm {
        LocalVm { paused: true, ..running(name, generation) }
    }

    fn view_of(s: &ClusterState, me: u32) -> (HostId, u64) {
        (HostId(me), s.hosts[&HostId(me)].epoch)
    }

    /// A live migration seen by both ends: the destination keeps its paused copy and never
    /// resumes it before the switchover; the source never resumes a completed (paused) copy while
    /// the VM migrates. After the switchover the destination resumes and the source kills; after
    /// an abort the source resumes and the destination kills.
    #[test]
    fn a_paused_copy_resumes_only_once_committed_state_says_so() {
        let mut s = cluster(2, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 256), 0);
        let from = gen_of(&s, "a");
        s.apply(&Command::StartMigration { name: "a".into(), to: HostId(1), force: false, evacuation: false, across_sites: false }).expect("start");
        let to = s.vms["a"].migrating_to().expect("migrating").generation;
        let none = BTreeSet::new();
        let at = |s: &ClusterState, me: u32, local: &[LocalVm], r: &mut Reconciler| {
            let (me, epoch) = view_of(s, me);
            r.pass(&View { me, joined: Some(epoch), state: s, local, stopping: &none, starting: &none, serving: &none, may_start: true }, Millis(0))
        };
        let (mut src, mut dst) = (Reconciler::default(), Reconciler::default());
        assert_eq!(at(&s, 0, &[paused("a", from)], &mut src), vec![], "a completed source waits for the commit");
        assert_eq!(at(&s, 1, &[paused("a", to)], &mut dst), vec![], "the destination's copy waits, untouched");
        let mut switched = s.clone();
        switched.apply(&Command::MigrationSwitchover { name: "a".into(), generation: to, arrives_home: false }).expect("switch");
        assert_eq!(at(&switched, 1, &[paused("a", to)], &mut dst), vec![Action::Resume { name: "a".into(), generation: to }]);
        assert_eq!(at(&switched, 0, &[paused("a", from)], &mut src), vec![Action::Kill { name: "a".into(), reason: KillReason::NotAssignedHere }]);
        // A driver whose migration is a stop and a start (processes): the source does not start
        // it again while it migrates; the destination starts it after the switchover.
        assert_eq!(at(&s, 0, &[], &mut src), vec![]);
        assert_eq!(at(&switched, 1, &[], &mut dst), vec![Action::Start { name: "a".into(), generation: to }]);
        let mut aborted = s.clone();
        aborted.apply(&Command::MigrationAbort { name: "a".into(), generation: to, reason: "x".into() }).expect("abort");
        assert_eq!(at(&aborted, 0, &[paused("a", from)], &mut src), vec![Action::Resume { name: "a".into(), generation: from }]);
        assert_eq!(at(&aborted, 1, &[paused("a", to)], &mut dst), vec![Action::Kill { name: "a".into(), reason: KillReason::NotAssignedHere }]);
        // A source whose copy serves post-copy pages keeps it until its migration kills it.
        let serving: BTreeSet<String> = ["a".to_string()].into();
        let (me, epoch) = view_of(&switched, 0);
        let local = [paused("a", from)];
        let v = View { me, joined: Some(epoch), state: &switched, local: &local, stopping: &none, starting: &none, serving: &serving, may_start: true };
        assert_eq!(Reconciler::default().pass(&v, Millis(0)), vec![], "a copy serving post-copy pages was killed");
        // Without the lease nothing resumes.
        let (me, epoch) = view_of(&switched, 1);
        let local = [paused("a", to)];
        let v = View { me, joined: Some(epoch), state: &switched, local: &local, stopping: &none, starting: &none, serving: &none, may_start: false };
        assert_eq!(Reconciler::default().pass(&v, Millis(0)), vec![]);
    }

    fn exited(name: &str, generation: u64, exit: VmExit) -> LocalVm {
        LocalVm { name: name.into(), generation, exit: Some(exit), paused: false }
    }

    fn view<'a>(s: &'a ClusterState, local: &'a [LocalVm], none: &'a BTreeSet<String>) -> View<'a> {
        View { me: HostId(0), joined: Some(s.hosts[&HostId(0)].epoch), state: s, local, stopping: none, starting: none, serving: none, may_start: true }
    }

    fn gen_of(s: &ClusterState, name: &str) -> u64 {
        s.vms[name].assignment().map_or(0, |a| a.generation)
    }

    /// Two hosts; `a` (protected) and `b` (best-effort) assigned to host 0.
    fn two_hosts() -> ClusterState {
        let mut s = cluster(2, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 256), 0);
        run_on(&mut s, process_vm("b", Protection::BestEffort, 0, 256), 0);
        s
    }

    fn names(actions: &[Action], f: impl Fn(&Action) -> Option<&str>) -> Vec<String> {
        actions.iter().filter_map(f).map(str::to_string).collect()
    }

    fn started(actions: &[Action]) -> Vec<String> {
        names(actions, |a| if let Action::Start { name, .. } = a { Some(name) } else { None })
    }

    #[test]
    fn wanted_vms_start_and_nothing_starts_without_the_lease() {
        let s = two_hosts();
        let none = BTreeSet::new();
        let mut r = Reconciler::default();
        assert_eq!(started(&r.pass(&view(&s, &[], &none), Millis(0))), ["a", "b"]);
        let local = [running("a", gen_of(&s, "a"))];
        assert_eq!(started(&r.pass(&view(&s, &local, &none), Millis(0))), ["b"], "a running one is not started again");
        let no_lease = View { may_start: false, ..view(&s, &[], &none) };
        assert_eq!(started(&r.pass(&no_lease, Millis(0))), Vec::<String>::new());
        let starting: BTreeSet<String> = ["a".to_string()].into();
        assert_eq!(started(&r.pass(&View { starting: &starting, ..view(&s, &[], &none) }, Millis(0))), ["b"]);
    }

    /// Not joined (or fenced), or not active in the epoch it joined in: everything is killed and
    /// nothing else happens.
    #[test]
    fn an_unjoined_or_stale_host_kills_everything() {
        let s = two_hosts();
        let none = BTreeSet::new();
        let local = [running("a", gen_of(&s, "a")), running("b", gen_of(&s, "b"))];
        let mut r = Reconciler::default();
        let unjoined = r.pass(&View { joined: None, ..view(&s, &local, &none) }, Millis(0));
        assert_eq!(unjoined.len(), 2);
        assert!(unjoined.iter().all(|a| matches!(a, Action::Kill { reason: KillReason::NotJoined, .. })), "{unjoined:?}");
        let old_epoch = r.pass(&View { joined: Some(99), ..view(&s, &local, &none) }, Millis(0));
        assert!(old_epoch.iter().all(|a| matches!(a, Action::Kill { reason: KillReason::NotActive, .. })), "{old_epoch:?}");
    }

    /// A process of an older generation (started from state that has since moved on) is
    /// killed, and the current generation waits for the next pass.
    #[test]
    fn a_process_of_another_generation_is_killed() {
        let s = two_hosts();
        let none = BTreeSet::new();
        let local = [running("a", gen_of(&s, "a") - 1)];
        let actions = Reconciler::default().pass(&view(&s, &local, &none), Millis(0));
        assert!(actions.contains(&Action::Kill { name: "a".into(), reason: KillReason::NotAssignedHere }), "{actions:?}");
        assert_eq!(started(&actions), ["b"]);
    }

    /// An operator's stop: a graceful stop while it runs (once), then the release.
    #[test]
    fn a_stopped_vm_is_stopped_gracefully_then_released() {
        let mut s = two_hosts();
        s.apply(&Command::SetPower { name: "a".into(), desired: PowerState::Stopped, force: false }).expect("stop");
        let none = BTreeSet::new();
        let g = gen_of(&s, "a");
        let local = [running("a", g)];
        let mut r = Reconciler::default();
        let actions = r.pass(&view(&s, &local, &none), Millis(0));
        assert!(actions.contains(&Action::Stop { name: "a".into() }), "{actions:?}");
        let stopping: BTreeSet<String> = ["a".to_string()].into();
        let again = r.pass(&View { stopping: &stopping, ..view(&s, &local, &none) }, Millis(0));
        assert!(!again.iter().any(|a| matches!(a, Action::Stop { .. } | Action::Release { .. })), "{again:?}");
        let after = r.pass(&view(&s, &[exited("a", g, VmExit::StoppedByAgent)], &none), Millis(0));
        assert!(after.contains(&Action::Release { name: "a".into(), generation: g }), "{after:?}");
    }

    /// A guest that powers itself off, or an unprotected VM that crashes, is proposed stopped
    /// and not started again in the same pass; a protected crash restarts within the budget,
    /// then the host gives it up and never starts that generation again.
    #[test]
    fn exits_decide_what_follows() {
        let s = two_hosts();
        let none = BTreeSet::new();
        let (ga, gb) = (gen_of(&s, "a"), gen_of(&s, "b"));
        let mut r = Reconciler::default();
        let shutdown = r.pass(&view(&s, &[exited("a", ga, VmExit::GuestShutdown), running("b", gb)], &none), Millis(0));
        assert!(shutdown.contains(&Action::MarkStopped { name: "a".into(), generation: ga, cause: StopCause::GuestShutdown }), "{shutdown:?}");
        assert_eq!(started(&shutdown), Vec::<String>::new());
        // The stop proposal failed (committed state still runs it here): proposed again, and
        // the guest that shut itself down is not restarted.
        let retried = r.pass(&view(&s, &[running("b", gb)], &none), Millis(0));
        assert!(retried.contains(&Action::MarkStopped { name: "a".into(), generation: ga, cause: StopCause::GuestShutdown }), "{retried:?}");
        assert_eq!(started(&retried), Vec::<String>::new());
        let mut r = Reconciler::default();
        let crash = || VmExit::Crashed { detail: "boom".into() };
        let unprotected = r.pass(&view(&s, &[running("a", ga), exited("b", gb, crash())], &none), Millis(0));
        assert!(unprotected.iter().any(|a| matches!(a, Action::MarkStopped { name, cause: StopCause::UnprotectedCrash { .. }, .. } if name == "b")));
        assert_eq!(started(&unprotected), Vec::<String>::new());
        for t in 0..MAX_LOCAL_RESTARTS as u64 {
            let p = r.pass(&view(&s, &[exited("a", ga, crash()), running("b", gb)], &none), Millis(t * 1000));
            assert_eq!(started(&p), ["a"], "restart {t} within the budget");
        }
        let spent = r.pass(&view(&s, &[exited("a", ga, crash()), running("b", gb)], &none), Millis(5000));
        assert!(spent.iter().any(|a| matches!(a, Action::GiveUp { name, .. } if name == "a")), "{spent:?}");
        assert_eq!(started(&spent), Vec::<String>::new());
        // Committed state still assigns it here (the release is not applied yet): asked again,
        // never started.
        let later = r.pass(&view(&s, &[running("b", gb)], &none), Millis(6000));
        assert!(later.iter().any(|a| matches!(a, Action::GiveUp { name, .. } if name == "a")), "{later:?}");
        assert_eq!(started(&later), Vec::<String>::new());
        // The budget refills after the window.
        let mut fresh = Reconciler::default();
        for t in [0, 1, 2, 70] {
            assert!(fresh.allow_restart("x", Millis(t * 1000)), "attempt at {t} s");
        }
    }

    /// Holds a placed VM back, as a failover does for a higher restart group.
    fn hold(v: &mut crate::state::VmRecord) {
        if let crate::state::VmPhase::Placed { at } = v.phase {
            v.phase = crate::state::VmPhase::Held { at };
        }
    }

    /// A held VM (a lower restart group is still starting) is not started.
    #[test]
    fn a_held_vm_waits() {
        let mut s = two_hosts();
        if let Some(v) = s.vms.get_mut("a") {
            hold(v);
        }
        let none = BTreeSet::new();
        assert_eq!(started(&Reconciler::default().pass(&view(&s, &[], &none), Millis(0))), ["b"]);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever runs here and whatever committed state says: nothing starts unless it is
            /// committed running here at that generation, not held, not already running, with
            /// the lease; a host not joined only kills; nothing is both started and killed.
            #[test]
            fn starts_only_what_committed_state_runs_here(
                assigned in proptest::collection::vec((0u32..3, any::<bool>(), any::<bool>()), 1..6),
                local in proptest::collection::vec((0usize..6, 0u64..3, 0u8..4), 0..6),
                joined in any::<bool>(),
                may_start in any::<bool>(),
            ) {
                let mut s = cluster(3, 1 << 20);
                for (i, (host, stopped, held)) in assigned.iter().enumerate() {
                    run_on(&mut s, process_vm(&format!("v{i}"), Protection::Protect, 0, 64), *host);
                    if *stopped {
                        s.apply(&Command::SetPower { name: format!("v{i}"), desired: PowerState::Stopped, force: false }).expect("stop");
                    }
                    if let Some(v) = s.vms.get_mut(&format!("v{i}")).filter(|_| *held) {
                        // (A stopping VM is not held: its host stops it whatever its group.)
                        hold(v);
                    }
                }
                let local: Vec<LocalVm> = local
                    .iter()
                    .map(|(i, dg, e)| {
                        let name = format!("v{}", i % assigned.len());
                        let generation = gen_of(&s, &name).saturating_sub(*dg);
                        let exit = match e { 0 => Some(VmExit::GuestShutdown), 1 => Some(VmExit::Crashed { detail: "x".into() }), _ => None };
                        LocalVm { name, generation, exit, paused: false }
                    })
                    .collect();
                let none = BTreeSet::new();
                let v = View { joined: joined.then(|| s.hosts[&HostId(0)].epoch), may_start, ..view(&s, &local, &none) };
                let actions = Reconciler::default().pass(&v, Millis(0));
                if !joined {
                    let only_kills = actions.iter().all(|a| matches!(a, Action::Kill { .. }));
                    prop_assert!(only_kills, "an unjoined host only kills: {:?}", actions);
                }
                let killed: BTreeSet<&str> = actions.iter().filter_map(|a| if let Action::Kill { name, .. } = a { Some(name.as_str()) } else { None }).collect();
                for a in &actions {
                    if let Action::Start { name, generation } = a {
                        let vm = &s.vms[name];
                        prop_assert!(may_start);
                        prop_assert_eq!(vm.desired(), PowerState::Running);
                        prop_assert_eq!(vm.assignment().map(|x| (x.host, x.generation)), Some((HostId(0), *generation)));
                        prop_assert!(!vm.held());
                        prop_assert!(!local.iter().any(|l| l.name == *name && l.exit.is_none()), "{} already runs", name);
                        prop_assert!(!killed.contains(name.as_str()));
                    }
                }
            }
        }
    }
}
