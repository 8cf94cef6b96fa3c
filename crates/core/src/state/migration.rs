//! Live migration in committed state: starting one, its switchover, its abort — and the rule that
//! makes it safe: the VM's assignment moves to the destination only by the commit of
//! [`Command::MigrationSwitchover`], which the source proposes once QEMU reports the migration
//! complete with the destination still paused. Before that commit the source owns the VM (and
//! resumes it if the migration fails); after it, the destination resumes it and the source never
//! does. The log orders a switchover and an abort (or a failover of either host): the first one
//! applied decides, and the other is refused as stale.

use super::admission::AdmitMode;
use super::*;

/// Live migrations leaving one host at once (KubeVirt allows two outbound per node).
pub const MAX_OUTGOING_MIGRATIONS: usize = 2;
/// Live migrations arriving at one host at once.
pub const MAX_INCOMING_MIGRATIONS: usize = 2;
/// Live migrations in the whole cluster at once.
pub const MAX_CLUSTER_MIGRATIONS: usize = 8;

impl ClusterState {
    /// VMs live-migrating now: (name, source, destination).
    pub fn migrations(&self) -> impl Iterator<Item = (&str, Assignment, Assignment)> {
        self.vms.values().filter_map(|v| match v.phase {
            VmPhase::Migrating { at, to } => Some((v.spec.name.as_str(), at, to)),
            _ => None,
        })
    }

    /// Where `name` would go if no destination is named: of the hosts that may take it now
    /// (active, normal mode, room, hard rules, and for disks mirrored between sites a current
    /// copy at the host's site), the one with the most free memory (the lowest id among
    /// equals) — for a mirrored VM, a host of its own site first: a move there keeps both
    /// copies current, one to another site leaves the copy it ran on behind until the mirror
    /// from the new site catches it up. `None` when none may.
    #[must_use]
    pub fn migration_target(&self, name: &str) -> Option<HostId> {
        let vm = self.vms.get(name)?;
        let from = vm.assignment()?.host;
        let demand = vm.spec.demand();
        self.hosts
            .values()
            .filter(|h| h.id != from && self.check_target(name, h.id, demand).is_ok())
            .max_by_key(|h| (self.keeps_site(name, h.id), h.capacity.memory_mib.saturating_sub(self.used(h.id).memory_mib), std::cmp::Reverse(h.id)))
            .map(|h| h.id)
    }

    /// Whether a live move of `name` to `host` keeps both its copies current: it has no disk
    /// mirrored between sites, or `host` is at the site where it runs. (A move to another site
    /// leaves the copy it ran on behind until the mirror from there catches it up.)
    #[must_use]
    pub fn keeps_site(&self, name: &str, host: HostId) -> bool {
        let Some(vm) = self.vms.get(name) else { return true };
        let site_of = |h: HostId| self.hosts.get(&h).and_then(|r| r.site.as_ref());
        !vm.spec.site_mirrored() || vm.assignment().is_some_and(|a| site_of(a.host) == site_of(host))
    }

    /// Whether `name` could migrate to `host` now (placement checks only: active, normal mode,
    /// room, hard rules, a current copy there; not where it already is).
    #[must_use]
    pub fn may_take(&self, name: &str, host: HostId) -> bool {
        let Some(vm) = self.vms.get(name) else { return false };
        vm.assignment().is_some_and(|a| a.host != host) && self.check_target(name, host, vm.spec.demand()).is_ok()
    }

    /// The command that starts the live migration of `name` to `to` as this state sees it
    /// (whether it crosses sites, see [`ClusterState::keeps_site`]).
    #[must_use]
    pub fn start_migration_command(&self, name: &str, to: HostId, force: bool, evacuation: bool) -> Command {
        Command::StartMigration { name: name.to_string(), to, force, evacuation, across_sites: !self.keeps_site(name, to) }
    }

    /// A planner's step (on a copy): the migration of `name` to `to` begins, unjudged by
    /// admission control, so that the room it holds counts for the next step.
    pub fn begin_planned_migration(&mut self, name: &str, to: HostId) -> Result<Applied, StateError> {
        let cmd = self.start_migration_command(name, to, true, true);
        self.apply_with(&cmd, AdmitMode::Trial)
    }

    /// The switchover of `name`'s migration to `generation`, as its source proposes it: one
    /// that reaches the VM's home says so, and the VM forgets its home there.
    #[must_use]
    pub fn switchover_command(&self, name: &str, generation: u64) -> Command {
        let arrives_home = self.vms.get(name).is_some_and(|v| v.home.is_some() && v.home == v.migrating_to().map(|t| t.host));
        Command::MigrationSwitchover { name: name.to_string(), generation, arrives_home }
    }

    pub(super) fn start_migration(
        &mut self,
        mode: AdmitMode<'_>,
        cmd: &Command,
        name: &str,
        to: HostId,
        evacuation: bool,
        across_sites: bool,
    ) -> Result<Applied, StateError> {
        let vm = self.vms.get(name).ok_or_else(|| StateError::UnknownVm(name.to_string()))?;
        let refuse = |why: String| Err(StateError::NotMigratable { name: name.to_string(), why });
        let from = match vm.phase {
            VmPhase::Placed { at } => at,
            VmPhase::Migrating { to, .. } => return refuse(format!("it is already migrating to {}", to.host)),
            VmPhase::Held { .. } => return refuse("its restart group has not started yet".into()),
            VmPhase::Stopped | VmPhase::Stopping { .. } | VmPhase::Failed { .. } => return refuse("it is not running".into()),
            VmPhase::Waiting { .. } => return refuse("it is not placed on any host yet".into()),
            VmPhase::Parked { host, .. } => return refuse(format!("it was shut down with its host {host}'s planned stop")),
        };
        if from.host == to {
            return refuse(format!("it already runs on {to}"));
        }
        // What the entry says of the move must be what it is: an entry of an older release
        // never says it crosses sites (that release refused such a move, and so do its hosts).
        match (self.keeps_site(name, to), across_sites) {
            (false, false) => {
                return refuse(
                    "its disks are mirrored between sites: a move to another site must say so (an older release moved it only within its site)".into(),
                )
            }
            (true, true) => return refuse(format!("the move to {to} was proposed as one to another site, and it is not (any more)")),
            _ => {}
        }
        if self.hosts.get(&from.host).is_none_or(|h| h.status != HostStatus::Active) {
            return refuse(format!("its host {} is not active", from.host));
        }
        let running: Vec<(&str, Assignment, Assignment)> = self.migrations().collect();
        if running.len() >= MAX_CLUSTER_MIGRATIONS {
            return Err(StateError::MigrationLimit(format!("{} already run in the cluster (at most {MAX_CLUSTER_MIGRATIONS})", running.len())));
        }
        let out = running.iter().filter(|(_, f, _)| f.host == from.host).count();
        if out >= MAX_OUTGOING_MIGRATIONS {
            return Err(StateError::MigrationLimit(format!("{out} already leave {} (at most {MAX_OUTGOING_MIGRATIONS})", from.host)));
        }
        let inc = running.iter().filter(|(_, _, t)| t.host == to).count();
        if inc >= MAX_INCOMING_MIGRATIONS {
            return Err(StateError::MigrationLimit(format!("{inc} already arrive at {to} (at most {MAX_INCOMING_MIGRATIONS})")));
        }
        let demand = vm.spec.demand();
        self.check_target(name, to, demand)?;
        let mut started = None;
        let applied = self.admit(mode, cmd, |s| {
            let generation = s.next_gen();
            let to = Assignment { host: to, generation };
            if let Some(v) = s.vms.get_mut(name) {
                v.begin_migration(to);
                // An evacuation remembers where the VM came from (a second evacuation keeps the
                // first home), and a move back home keeps it until the switchover reaches it; an
                // operator's migration decides anew.
                v.home = if evacuation { v.home.or(Some(from.host)) } else { None };
            }
            started = Some(to);
            Ok(())
        })?;
        Ok(match (applied, started) {
            (Applied::Done, Some(to)) => Applied::MigrationStarted { name: name.to_string(), from, to },
            (other, _) => other,
        })
    }

    pub(super) fn migration_switchover(&mut self, name: &str, generation: u64, arrives_home: bool) -> Result<Applied, StateError> {
        let vm = self.vms.get(name).ok_or_else(|| StateError::UnknownVm(name.to_string()))?;
        let Some(to) = vm.migrating_to().filter(|t| t.generation == generation) else {
            return Err(StateError::NotMigrating { name: name.to_string(), generation });
        };
        // A destination that was failed over has had its paused copy killed; its failover already
        // ended the migration, so this cannot happen — checked all the same.
        if self.hosts.get(&to.host).is_none_or(|h| h.status != HostStatus::Active) {
            return Err(StateError::HostNotActive(to.host));
        }
        // A mirrored disk's copy at the destination's site may have been left behind while the
        // memory moved (the source switched onto another site's copy when its storage failed):
        // the destination opened that copy, so it must not take over — the source aborts and
        // goes on where the writes are.
        if !self.copy_current_on(vm, to.host) {
            return Err(StateError::StaleCopy { vm: name.to_string(), host: to.host, current: vm.copies.join(", ") });
        }
        let vm = self.vm_mut(name)?;
        vm.end_migration(true);
        if arrives_home && vm.home == Some(to.host) {
            vm.home = None;
        }
        Ok(Applied::Migrated { name: name.to_string(), to })
    }

    pub(super) fn migration_abort(&mut self, name: &str, generation: u64, reason: &str) -> Result<Applied, StateError> {
        let vm = self.vm_mut(name)?;
        if vm.migrating_to().is_none_or(|t| t.generation != generation) {
            return Err(StateError::NotMigrating { name: name.to_string(), generation });
        }
        vm.end_migration(false);
        Ok(Applied::MigrationAborted { name: name.to_string(), reason: reason.to_string() })
    }

    /// A failover of `host` ends every migration towards it: the source keeps those VMs (the
    /// destination's paused copy dies with the host's fencing, and it never resumed — no
    /// switchover was committed). Migrations away from it end with the failover itself (the
    /// VM is released like every other VM of the host).
    pub(super) fn abort_migrations_to(&mut self, host: HostId) -> Vec<String> {
        let names: Vec<String> = self.migrations().filter(|(_, _, to)| to.host == host).map(|(n, _, _)| n.to_string()).collect();
        for n in &names {
            if let Some(v) = self.vms.get_mut(n) {
                v.end_migration(false);
            }
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{cluster, process_vm, run_on};

    fn migrating(s: &ClusterState, name: &str) -> (Assignment, Assignment) {
        match s.vms[name].phase {
            VmPhase::Migrating { at, to } => (at, to),
            ref p => panic!("{name} is {p:?}, not migrating"),
        }
    }

    fn start(s: &mut ClusterState, name: &str, to: u32) -> Result<Applied, StateError> {
        s.apply(&Command::StartMigration { name: name.into(), to: HostId(to), force: false, evacuation: false, across_sites: false })
    }

    #[test]
    fn the_switchover_commit_moves_the_assignment_and_only_once() {
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 1024), 0);
        let before = s.vms["a"].assignment().expect("placed");
        let Applied::MigrationStarted { from, to, .. } = start(&mut s, "a", 1).expect("starts") else { panic!("not started") };
        assert_eq!((from, to.host), (before, HostId(1)));
        assert!(to.generation > before.generation);
        assert_eq!(s.vms["a"].assignment(), Some(before), "the source owns it until the switchover");
        assert_eq!(s.used(HostId(1)).memory_mib, 1024, "the destination's room is held");
        assert_eq!(s.used(HostId(0)).memory_mib, 1024);
        assert!(matches!(start(&mut s, "a", 2), Err(StateError::NotMigratable { .. })), "one migration at a time");
        assert_eq!(
            s.apply(&Command::MigrationSwitchover { name: "a".into(), generation: to.generation, arrives_home: false }),
            Ok(Applied::Migrated { name: "a".into(), to })
        );
        assert_eq!(s.vms["a"].phase, VmPhase::Placed { at: to });
        assert_eq!(s.used(HostId(0)).memory_mib, 0);
        // Whatever comes second is stale: an abort after the switchover, or a second switchover.
        let rev = s.revision;
        assert!(matches!(
            s.apply(&Command::MigrationAbort { name: "a".into(), generation: to.generation, reason: "x".into() }),
            Err(StateError::NotMigrating { .. })
        ));
        assert!(matches!(
            s.apply(&Command::MigrationSwitchover { name: "a".into(), generation: to.generation, arrives_home: false }),
            Err(StateError::NotMigrating { .. })
        ));
        assert_eq!(s.revision, rev, "refused commands change nothing");
    }

    #[test]
    fn an_abort_keeps_the_source_and_refuses_a_late_switchover() {
        let mut s = cluster(2, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 512), 0);
        let before = s.vms["a"].assignment().expect("placed");
        start(&mut s, "a", 1).expect("starts");
        let (_, to) = migrating(&s, "a");
        s.apply(&Command::MigrationAbort { name: "a".into(), generation: to.generation, reason: "cancelled".into() }).expect("aborts");
        assert_eq!(s.vms["a"].phase, VmPhase::Placed { at: before });
        assert!(s.apply(&Command::MigrationSwitchover { name: "a".into(), generation: to.generation, arrives_home: false }).is_err());
        assert_eq!(s.used(HostId(1)).memory_mib, 0, "the held room is given back");
    }

    #[test]
    fn refusals_say_why_and_change_nothing() {
        let mut s = cluster(3, 2048);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 1024), 0);
        run_on(&mut s, process_vm("big", Protection::Protect, 0, 1024), 1);
        run_on(&mut s, process_vm("big2", Protection::Protect, 0, 1024), 1);
        s.apply(&Command::CreateVm { spec: process_vm("off", Protection::Protect, 0, 64) }).expect("create");
        s.apply(&Command::SetHostMode { host: HostId(2), mode: HostMode::Maintenance, force: true }).expect("mode");
        let rev = s.revision;
        assert!(matches!(start(&mut s, "nope", 1), Err(StateError::UnknownVm(_))));
        assert!(matches!(start(&mut s, "off", 1), Err(StateError::NotMigratable { .. })), "not running");
        assert!(matches!(start(&mut s, "a", 0), Err(StateError::NotMigratable { .. })), "already there");
        assert!(matches!(start(&mut s, "a", 1), Err(StateError::NoCapacity { .. })), "full");
        assert!(matches!(start(&mut s, "a", 2), Err(StateError::HostMode { .. })), "maintenance");
        assert!(matches!(start(&mut s, "a", 7), Err(StateError::UnknownHost(_))));
        assert_eq!(s.revision, rev);
    }

    #[test]
    fn a_failover_of_either_end_ends_the_migration_safely() {
        // The destination fails: the source keeps the VM.
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 512), 0);
        let before = s.vms["a"].assignment().expect("placed");
        start(&mut s, "a", 1).expect("starts");
        let (_, to) = migrating(&s, "a");
        let epoch = s.hosts[&HostId(1)].epoch;
        s.apply(&Command::Failover { host: HostId(1), epoch, plan: vec![] }).expect("failover");
        assert_eq!(s.vms["a"].phase, VmPhase::Placed { at: before });
        assert!(s.apply(&Command::MigrationSwitchover { name: "a".into(), generation: to.generation, arrives_home: false }).is_err());
        // The source fails: the VM is restarted from its disk like any other of the host, in a new
        // generation, possibly on the former destination.
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 512), 0);
        start(&mut s, "a", 1).expect("starts");
        let (_, to) = migrating(&s, "a");
        let epoch = s.hosts[&HostId(0)].epoch;
        let out = s.apply(&Command::Failover { host: HostId(0), epoch, plan: vec![("a".into(), HostId(1))] }).expect("failover");
        let Applied::FailedOver { moved, .. } = out else { panic!("{out:?}") };
        assert_eq!(moved.len(), 1);
        let now = s.vms["a"].assignment().expect("moved");
        assert_eq!(now.host, HostId(1));
        assert_ne!(now.generation, to.generation, "a restart, never a resume of the paused copy");
        assert!(s.apply(&Command::MigrationSwitchover { name: "a".into(), generation: to.generation, arrives_home: false }).is_err());
    }

    #[test]
    fn an_operator_stop_ends_a_migration() {
        let mut s = cluster(2, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 512), 0);
        let before = s.vms["a"].assignment().expect("placed");
        start(&mut s, "a", 1).expect("starts");
        s.apply(&Command::SetPower { name: "a".into(), desired: PowerState::Stopped, force: true }).expect("stop");
        assert_eq!(s.vms["a"].phase, VmPhase::Stopping { at: before });
    }

    #[test]
    fn an_unnamed_destination_is_the_roomiest_host_that_may_take_it() {
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 0, 512), 0);
        run_on(&mut s, process_vm("b", Protection::Protect, 0, 1024), 1);
        assert_eq!(s.migration_target("a"), Some(HostId(2)));
        run_on(&mut s, process_vm("c", Protection::Protect, 0, 2048), 2);
        assert_eq!(s.migration_target("a"), Some(HostId(1)));
        assert_eq!(s.migration_target("nope"), None);
    }

    #[test]
    fn concurrent_migrations_are_bounded_per_host() {
        let mut s = cluster(3, 8192);
        for n in ["a", "b", "c"] {
            run_on(&mut s, process_vm(n, Protection::Protect, 0, 256), 0);
        }
        start(&mut s, "a", 1).expect("first");
        start(&mut s, "b", 2).expect("second");
        assert!(matches!(start(&mut s, "c", 1), Err(StateError::MigrationLimit(_))), "a third leaving host 0");
    }
}
