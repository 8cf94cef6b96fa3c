//! A host's planned stop with its VMs parked (the `shutdown` and `freeze` stop policies): the
//! host shuts its VMs down cleanly, then commits `HostLeave`; it is `left` — nobody fails it
//! over, its fence is nobody's business — and its VMs wait for it. When it rejoins they are
//! placed on it again; if a hold was given and passes first, the coordinator releases them
//! (`ReleaseParked`) to be placed elsewhere like any VM waiting for a host.
//!
//! Why no VM runs twice: a parked VM has no assignment, so no host runs it; the leaving host
//! proposes `HostLeave` only after its own VMs stopped, and a host that is `left` runs nothing
//! until it rejoins (membership: it is not active in its epoch). Its VMs are placed again only
//! by a command applied after the leave — the rejoin (on that host, new generation) or the
//! release (elsewhere, through placement) — whichever the log orders first; the other then
//! finds nothing parked.

use super::{Applied, Assignment, ClusterState, HostStatus, Protection, StateError, VmPhase};
use crate::hostset::HostId;

impl ClusterState {
    pub(super) fn host_leave(&mut self, host: HostId, epoch: u64, hold_ms: Option<u64>) -> Result<Applied, StateError> {
        let h = self.hosts.get(&host).ok_or(StateError::UnknownHost(host))?;
        if h.status != HostStatus::Active || h.epoch != epoch {
            return Err(StateError::Stale(format!("planned stop of {host} in epoch {epoch}, but the host is {:?} in epoch {}", h.status, h.epoch)));
        }
        if let Some((vm, _, _)) = self.migrations().find(|(_, from, _)| from.host == host) {
            return Err(StateError::Stale(format!("planned stop of {host}: {vm} is still migrating away from it")));
        }
        if let Some(h) = self.hosts.get_mut(&host) {
            h.status = HostStatus::Left;
        }
        self.abort_migrations_to(host);
        let mut parked = Vec::new();
        for vm in self.vms.values_mut().filter(|v| v.is_on(host)) {
            // A VM on the host's own storage has no hold: it can only wait for its host.
            vm.park(host, if vm.spec.bound_to_host() { None } else { hold_ms });
            if vm.parked().is_some() {
                parked.push(vm.spec.name.clone());
            }
        }
        Ok(Applied::HostLeft { host, parked })
    }

    /// The VMs parked with `host`, higher priority first.
    pub(super) fn parked_with(&self, host: HostId) -> Vec<String> {
        let mut names: Vec<(&String, i32)> =
            self.vms.values().filter(|v| v.parked().is_some_and(|(h, _)| h == host)).map(|v| (&v.spec.name, v.spec.priority)).collect();
        // Higher priority first: if the returning host has less room than before, they get it.
        names.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        names.into_iter().map(|(n, _)| n.clone()).collect()
    }

    pub(super) fn release_parked(&mut self, host: HostId) -> Result<Applied, StateError> {
        let h = self.hosts.get(&host).ok_or(StateError::UnknownHost(host))?;
        if h.status != HostStatus::Left {
            return Err(StateError::Stale(format!("release of the VMs parked with {host}, but the host is {:?}", h.status)));
        }
        // A VM whose disk is on the host's own storage stays parked: it can run nowhere else.
        let names: Vec<String> = self.parked_with(host).into_iter().filter(|n| self.vms.get(n).is_some_and(|v| !v.spec.bound_to_host())).collect();
        for name in &names {
            if let Some(vm) = self.vms.get_mut(name) {
                // As after a failover: protected VMs wait for room, best-effort ones for a
                // bounded number of retries, `off` ones are stopped.
                vm.phase = match vm.spec.protection {
                    Protection::Protect => VmPhase::Waiting { capacity_retries: None },
                    Protection::BestEffort => VmPhase::Waiting { capacity_retries: Some(0) },
                    Protection::Off => VmPhase::Stopped,
                };
            }
        }
        Ok(Applied::ParkedReleased { host, names })
    }

    /// After `host` joined in `epoch`: its parked VMs are placed on it again where it may take
    /// them (room, mode, hard rules), the others wait for any host. A VM whose disk is on the
    /// host's own storage goes back to it in any case: it can run nowhere else, and the room
    /// it takes was its own before the host left.
    pub(super) fn unpark_on_return(&mut self, host: HostId, epoch: u64) -> Result<Applied, StateError> {
        let (mut back, mut elsewhere) = (Vec::new(), Vec::new());
        for name in self.parked_with(host) {
            let Some((demand, bound)) = self.vms.get(&name).map(|v| (v.spec.demand(), v.spec.bound_to_host())) else { continue };
            // Waiting first, so the checks below count it like any VM being placed.
            if let Some(vm) = self.vms.get_mut(&name) {
                vm.phase = VmPhase::Waiting { capacity_retries: None };
            }
            if bound || self.check_target(&name, host, demand).is_ok() {
                let generation = self.next_gen();
                if let Some(vm) = self.vms.get_mut(&name) {
                    vm.place(Assignment { host, generation }, false);
                }
                back.push((name, generation));
            } else {
                elsewhere.push(name);
            }
        }
        if back.is_empty() && elsewhere.is_empty() {
            return Ok(Applied::HostEpoch { host, epoch });
        }
        Ok(Applied::Rejoined { host, epoch, back, elsewhere })
    }
}

#[cfg(test)]
mod tests {
    use crate::hostset::HostId;
    use crate::state::tests::{cluster, process_vm, run_on};
    use crate::state::{Applied, Command, HostStatus, PowerState, Protection, StateError};

    fn leave(s: &mut crate::state::ClusterState, h: u32, hold_ms: Option<u64>) -> Result<Applied, StateError> {
        let epoch = s.hosts[&HostId(h)].epoch;
        s.apply(&Command::HostLeave { host: HostId(h), epoch, hold_ms })
    }

    #[test]
    fn a_planned_stop_parks_the_hosts_vms_and_they_come_back_with_it() {
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("a", Protection::Protect, 1, 512), 0);
        run_on(&mut s, process_vm("b", Protection::BestEffort, 5, 512), 0);
        run_on(&mut s, process_vm("c", Protection::Protect, 0, 512), 1);
        let out = leave(&mut s, 0, None).expect("leaves");
        assert_eq!(out, Applied::HostLeft { host: HostId(0), parked: vec!["a".into(), "b".into()] });
        assert_eq!(s.hosts[&HostId(0)].status, HostStatus::Left);
        assert!(s.unplaced().is_empty(), "parked VMs are not for the coordinator to place");
        assert_eq!(s.vms["a"].desired(), PowerState::Running);
        assert!(s.vms["c"].is_on(HostId(1)), "other hosts' VMs are untouched");
        // A second leave, or a failover of a left host, is stale.
        assert!(matches!(leave(&mut s, 0, None), Err(StateError::Stale(_))));
        let epoch = s.hosts[&HostId(0)].epoch;
        assert!(matches!(s.apply(&Command::Failover { host: HostId(0), epoch, plan: vec![] }), Err(StateError::Stale(_))));
        // Back: both run there again, in new generations.
        let Ok(Applied::Rejoined { back, elsewhere, .. }) = s.apply(&Command::HostJoined { host: HostId(0) }) else { panic!("rejoin") };
        assert_eq!(back.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["b", "a"], "higher priority first");
        assert!(elsewhere.is_empty());
        assert!(s.vms["a"].is_on(HostId(0)) && s.vms["b"].is_on(HostId(0)));
        // Releasing now is stale: the host is back.
        assert!(matches!(s.apply(&Command::ReleaseParked { host: HostId(0) }), Err(StateError::Stale(_))));
    }

    #[test]
    fn released_parked_vms_wait_for_any_host_and_a_zero_hold_releases_at_once() {
        let mut s = cluster(3, 4096);
        run_on(&mut s, process_vm("p", Protection::Protect, 0, 512), 0);
        run_on(&mut s, process_vm("off", Protection::Off, 0, 512), 0);
        leave(&mut s, 0, Some(60_000)).expect("leaves");
        let out = s.apply(&Command::ReleaseParked { host: HostId(0) }).expect("released");
        assert_eq!(out, Applied::ParkedReleased { host: HostId(0), names: vec!["off".into(), "p".into()] });
        assert_eq!(s.unplaced(), vec!["p".to_string()], "protected: placed anywhere; off: stopped");
        assert_eq!(s.vms["off"].desired(), PowerState::Stopped);
        // The host comes back later: nothing parked is left for it.
        assert!(matches!(s.apply(&Command::HostJoined { host: HostId(0) }), Ok(Applied::HostEpoch { .. })));
        // A zero hold: waiting for another host at once.
        run_on(&mut s, process_vm("q", Protection::Protect, 0, 512), 1);
        leave(&mut s, 1, Some(0)).expect("leaves");
        assert!(s.unplaced().contains(&"q".to_string()));
    }

    #[test]
    fn a_host_that_returns_smaller_takes_back_what_fits_and_the_rest_waits() {
        let mut s = cluster(2, 1024);
        run_on(&mut s, process_vm("big", Protection::Protect, 9, 768), 0);
        run_on(&mut s, process_vm("small", Protection::Protect, 1, 256), 0);
        leave(&mut s, 0, None).expect("leaves");
        // Meanwhile an operator starts another VM that takes room on host 0 once it is back.
        s.apply(&Command::SetHostMode { host: HostId(0), mode: crate::state::HostMode::Maintenance, force: true }).expect("mode");
        let Ok(Applied::Rejoined { back, elsewhere, .. }) = s.apply(&Command::HostJoined { host: HostId(0) }) else { panic!("rejoin") };
        assert!(back.is_empty(), "a host in maintenance takes nothing back");
        assert_eq!(elsewhere, vec!["big".to_string(), "small".to_string()]);
        assert_eq!(s.unplaced().len(), 2);
    }

    #[test]
    fn a_host_still_sending_a_migration_cannot_leave() {
        let mut s = cluster(2, 4096);
        run_on(&mut s, process_vm("m", Protection::Protect, 0, 512), 0);
        s.apply(&Command::StartMigration { name: "m".into(), to: HostId(1), force: true, evacuation: false, across_sites: false }).expect("start");
        assert!(matches!(leave(&mut s, 0, None), Err(StateError::Stale(_))));
    }

    /// A VM whose disk is on its host's own storage: a failover parks it with the failed host
    /// (no plan moves it, the plan says why), a planned stop's release leaves it parked, and it
    /// runs on that host again when it rejoins — even in maintenance.
    #[test]
    fn a_vm_on_local_storage_waits_for_its_host() {
        let mut s = cluster(3, 4096);
        let mut local = process_vm("l", Protection::BestEffort, 0, 512);
        local.disks = vec![crate::state::DiskSpec { path: "l.raw".into(), format: None, readonly: false, local: true, mirror: false }];
        run_on(&mut s, local, 0);
        run_on(&mut s, process_vm("p", Protection::Protect, 0, 512), 0);
        let plan = crate::recovery::plan_failover(&s, HostId(0), s.members());
        assert_eq!(plan.placements.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["p"]);
        assert_eq!(plan.left_down, vec![("l".to_string(), crate::placement::LeftDown::LocalDisk)]);
        let epoch = s.hosts[&HostId(0)].epoch;
        let smuggled = vec![("l".to_string(), HostId(1)), ("p".to_string(), HostId(1))];
        let Ok(Applied::FailedOver { moved, left_down, .. }) = s.apply(&Command::Failover { host: HostId(0), epoch, plan: smuggled }) else {
            panic!("failover")
        };
        assert_eq!(moved.iter().map(|(n, _, _)| n.as_str()).collect::<Vec<_>>(), ["p"], "a plan naming it does not move it");
        assert_eq!(left_down, vec!["l".to_string()]);
        assert_eq!(s.vms["l"].parked(), Some((HostId(0), None)));
        assert!(!s.unplaced().contains(&"l".to_string()));
        s.apply(&Command::SetHostMode { host: HostId(0), mode: crate::state::HostMode::Maintenance, force: true }).expect("mode");
        let Ok(Applied::Rejoined { back, .. }) = s.apply(&Command::HostJoined { host: HostId(0) }) else { panic!("rejoin") };
        assert_eq!(back.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["l"]);
        assert!(s.vms["l"].is_on(HostId(0)));
        // A planned stop with a hold: the local VM is parked without one, and a release (for
        // the other VMs) leaves it parked.
        leave(&mut s, 0, Some(1_000)).expect("leaves");
        assert_eq!(s.vms["l"].parked(), Some((HostId(0), None)));
        let out = s.apply(&Command::ReleaseParked { host: HostId(0) }).expect("released");
        assert_eq!(out, Applied::ParkedReleased { host: HostId(0), names: vec![] });
        assert_eq!(s.vms["l"].parked(), Some((HostId(0), None)));
    }

    /// Seed 224 of the simulator with local disks: a host back from a power loss reported the
    /// crash of a VM from its old view of committed state (it still ran the VM there), and its
    /// unconditional stop turned the VM — parked with that host by the failover — into a
    /// stopped one, so the host's return did not start it. The stop of an exited VM holds only
    /// for the assignment it exited in.
    #[test]
    fn a_stale_exit_report_does_not_stop_a_parked_vm() {
        let mut s = cluster(3, 4096);
        let mut local = process_vm("l", Protection::BestEffort, 0, 512);
        local.disks = vec![crate::state::DiskSpec { path: "l.raw".into(), format: None, readonly: false, local: true, mirror: false }];
        run_on(&mut s, local, 0);
        let generation = s.vms["l"].assignment().expect("placed").generation;
        let epoch = s.hosts[&HostId(0)].epoch;
        s.apply(&Command::Failover { host: HostId(0), epoch, plan: vec![] }).expect("h0 fails");
        assert_eq!(s.vms["l"].parked(), Some((HostId(0), None)));
        let stale = s.apply(&Command::StopExited { name: "l".into(), host: HostId(0), generation });
        assert!(matches!(stale, Err(StateError::Stale(_))), "{stale:?}");
        assert_eq!(s.vms["l"].parked(), Some((HostId(0), None)), "still parked");
        let Ok(Applied::Rejoined { back, .. }) = s.apply(&Command::HostJoined { host: HostId(0) }) else { panic!("rejoin") };
        assert_eq!(back.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["l"]);
        // A current report stops it where it ran; its host then releases it.
        let generation = s.vms["l"].assignment().expect("back").generation;
        s.apply(&Command::StopExited { name: "l".into(), host: HostId(0), generation }).expect("stops");
        assert_eq!(s.vms["l"].desired(), PowerState::Stopped);
        s.apply(&Command::Release { name: "l".into(), host: HostId(0), generation }).expect("released");
        assert!(s.vms["l"].assignment().is_none());
    }

    /// Seed 241 of the simulator with local disks: a stopped VM whose disk is on its host's own
    /// storage was started again on another host, from that host's older copy. Committed state
    /// keeps where the latest copy is (moved by a live migration's switchover, kept while the
    /// VM is stopped), and a start places it there or nowhere.
    #[test]
    fn a_stopped_vm_on_local_storage_starts_again_only_where_its_disk_is() {
        let mut s = cluster(3, 4096);
        let mut local = process_vm("l", Protection::Off, 0, 512);
        local.disks = vec![crate::state::DiskSpec { path: "l.raw".into(), format: None, readonly: false, local: true, mirror: false }];
        run_on(&mut s, local, 0);
        assert_eq!(s.vms["l"].disk_host, Some(HostId(0)));
        s.apply(&Command::StartMigration { name: "l".into(), to: HostId(1), force: true, evacuation: false, across_sites: false }).expect("start");
        assert_eq!(s.vms["l"].disk_host, Some(HostId(0)), "the source's copy is the latest until the switchover");
        let generation = s.vms["l"].migrating_to().expect("migrating").generation;
        s.apply(&Command::MigrationSwitchover { name: "l".into(), generation, arrives_home: false }).expect("switchover");
        assert_eq!(s.vms["l"].disk_host, Some(HostId(1)));
        s.apply(&Command::SetPower { name: "l".into(), desired: PowerState::Stopped, force: false }).expect("stop");
        let generation = s.vms["l"].assignment().expect("stopping").generation;
        s.apply(&Command::Release { name: "l".into(), host: HostId(1), generation }).expect("released");
        let epoch = s.hosts[&HostId(1)].epoch;
        s.apply(&Command::Failover { host: HostId(1), epoch, plan: vec![] }).expect("h1 fails");
        s.apply(&Command::SetPower { name: "l".into(), desired: PowerState::Running, force: false }).expect("started again");
        let plan = crate::recovery::place(&s, &["l".to_string()], s.active_hosts(), true);
        assert!(plan.placements.is_empty(), "placed away from its disk: {plan:?}");
        let why = crate::recovery::waiting_reason(&s, "l", s.active_hosts()).expect("a reason");
        assert!(why.contains("latest copy is on h1"), "{why}");
        s.apply(&Command::HostJoined { host: HostId(1) }).expect("h1 back");
        let plan = crate::recovery::place(&s, &["l".to_string()], s.active_hosts(), true);
        assert_eq!(plan.placements, vec![("l".to_string(), HostId(1))]);
        // An aborted migration leaves the copy where it was.
        s.apply(&Command::Assign { name: "l".into(), host: HostId(1) }).expect("assign");
        s.apply(&Command::StartMigration { name: "l".into(), to: HostId(2), force: true, evacuation: false, across_sites: false }).expect("start");
        let generation = s.vms["l"].migrating_to().expect("migrating").generation;
        s.apply(&Command::MigrationAbort { name: "l".into(), generation, reason: "test".into() }).expect("abort");
        assert_eq!(s.vms["l"].disk_host, Some(HostId(1)));
    }
}
