//! Site-mirrored disks in committed state: which sites' copies are current.
//!
//! A VM whose disks are mirrored between sites (`mirror = true`) runs on its site's copy, and
//! its host's QEMU mirrors every write synchronously into one other site's copy. Committed
//! state keeps, per VM, the sites whose copies hold every write the guest had acknowledged
//! (`VmRecord::copies`), and the whole safety of site failover rests on three rules:
//!
//! - A start — an assignment, a failover's restart, a parked VM's return, a switchover —
//!   places the VM only at a site whose copy is current (`check_target`, and the placement
//!   model's `avoid`), and leaves that site's copy the only current one: the others miss what
//!   the VM writes until its mirror catches them up.
//! - A copy becomes current again only by `mirror-synced`, proposed by the host running the VM
//!   in that very generation once its mirror into that copy is in sync (every later write goes
//!   to both before the guest sees it complete).
//! - A copy stops being current by `mirror-degraded`, proposed by that host when the copy stops
//!   answering. Until it is committed, the guest's writes wait (the agent's relay holds them);
//!   only then may they complete on the running site's copy alone. So a write acknowledged on
//!   one copy follows, in the log, the entry that made every other copy stale — and no later
//!   start can use a copy that lacks it. A host that cannot commit (it is on the losing side
//!   of a cut) never lets a write complete on one copy: it is fenced with the writes still held.
//!
//! Both commands apply only while the VM is still assigned in the generation they name: a
//! report from a host that has since been failed over changes nothing.

use super::{Applied, ClusterState, StateError, VmRecord};
use crate::hostset::HostId;

impl ClusterState {
    /// Whether `vm` may start on `host` as far as its mirrored disks go: at a site whose copy is
    /// current (any site before it first ran). A host without a site has no copy.
    #[must_use]
    pub fn copy_current_on(&self, vm: &VmRecord, host: HostId) -> bool {
        if !vm.spec.site_mirrored() {
            return true;
        }
        match self.hosts.get(&host).and_then(|h| h.site.as_ref()) {
            None => false,
            Some(site) => vm.copies.is_empty() || vm.copies.contains(site),
        }
    }

    /// The sites whose copies of `name` committed state counts current, other than the site of
    /// `host`, which is about to start it in its current generation: each must be committed
    /// stale first (`mirror-degraded`). A placement already left only its own site's copy
    /// current; this is for a start again in the same generation — after a crash, or after the
    /// host's agent restarted — whose new process writes its site's copy with no mirror until
    /// one is attached and in sync again.
    /// Empty when `host`'s own site's copy is not current (the VM switched onto another
    /// site's copy): that start must not happen at all (`copy_current_on`), and leaving the
    /// other copies behind would leave none.
    #[must_use]
    pub fn copies_to_leave_behind(&self, name: &str, host: HostId) -> Vec<String> {
        let site = self.hosts.get(&host).and_then(|h| h.site.as_ref());
        let Some(vm) = self.vms.get(name).filter(|v| v.spec.site_mirrored()) else { return Vec::new() };
        if !self.copy_current_on(vm, host) {
            return Vec::new();
        }
        vm.copies.iter().filter(|s| Some(*s) != site).cloned().collect()
    }

    /// The hosts where a site-mirrored `vm` may not start, its copy there not current (none for
    /// any other VM: the placement model asks for every VM, so the others cost nothing).
    #[must_use]
    pub fn stale_copy_hosts(&self, vm: &VmRecord) -> Vec<HostId> {
        if !vm.spec.site_mirrored() {
            return Vec::new();
        }
        self.hosts.keys().copied().filter(|h| !self.copy_current_on(vm, *h)).collect()
    }

    /// The site whose copy a new mirror link of `vm`, running on `host`, should write (one per
    /// disk, kept for the generation): the site of the VM's home when that is another site with
    /// an active host — an evacuated VM goes back there, live, only once that copy is current
    /// again —, else the first other site by name with an active host, else the first other
    /// site (a link that attaches nothing still resumes a guest paused by its own storage).
    #[must_use]
    pub fn mirror_site_for(&self, vm: &VmRecord, host: HostId) -> Option<String> {
        let site_of = |h: HostId| self.hosts.get(&h).and_then(|r| r.site.clone());
        let mine = site_of(host);
        let others: Vec<(String, Vec<HostId>)> = self.sites().into_iter().filter(|(site, _)| Some(site) != mine.as_ref()).collect();
        let active = |hosts: &[HostId]| hosts.iter().any(|h| self.hosts.get(h).is_some_and(|r| r.status == super::HostStatus::Active));
        let home = vm.home.and_then(site_of).filter(|site| others.iter().any(|(s, hosts)| s == site && active(hosts)));
        home.or_else(|| others.iter().find(|(_, hosts)| active(hosts)).map(|(s, _)| s.clone())).or_else(|| others.first().map(|(s, _)| s.clone()))
    }

    /// After a command placed VMs (`applied` says which, and where): a site-mirrored VM's copy
    /// at its new site is now the only current one.
    pub(super) fn note_copies(&mut self, applied: &Applied) {
        let placed: Vec<(String, HostId)> = match applied {
            Applied::Assigned { name, host, .. } => vec![(name.clone(), *host)],
            Applied::FailedOver { moved, .. } => moved.iter().map(|(n, h, _)| (n.clone(), *h)).collect(),
            Applied::Rejoined { host, back, .. } => back.iter().map(|(n, _)| (n.clone(), *host)).collect(),
            Applied::Migrated { name, to } => vec![(name.clone(), to.host)],
            _ => return,
        };
        for (name, host) in placed {
            let site = self.hosts.get(&host).and_then(|h| h.site.clone());
            let Some(vm) = self.vms.get_mut(&name).filter(|v| v.spec.site_mirrored()) else { continue };
            // Every placement was checked by `check_target` (`copy_current_on`): one that was
            // not is a bug in `apply`, and committing it would spread it to every host.
            assert!(site.as_ref().is_some_and(|s| vm.copies.is_empty() || vm.copies.contains(s)), "{name} placed at a site without a current copy");
            vm.copies = site.into_iter().collect();
        }
    }

    /// `mirror-synced`: the host running `name` in `generation` reports its mirror into `site`'s
    /// copy in sync.
    pub(super) fn mirror_synced(&mut self, name: &str, generation: u64, site: &str) -> Result<Applied, StateError> {
        let vm = self.mirror_owner(name, generation, site)?;
        if !vm.copies.iter().any(|s| s == site) {
            vm.copies.push(site.to_string());
            vm.copies.sort();
        }
        Ok(Applied::Done)
    }

    /// `mirror-degraded`: the host running `name` in `generation` lost `site`'s copy and lets
    /// the guest's writes complete without it.
    pub(super) fn mirror_degraded(&mut self, name: &str, generation: u64, site: &str) -> Result<Applied, StateError> {
        let running_site = self.vms.get(name).and_then(VmRecord::assignment).and_then(|a| self.hosts.get(&a.host)).and_then(|h| h.site.clone());
        if running_site.as_deref() == Some(site) {
            return Err(StateError::Stale(format!("VM '{name}' runs at site '{site}': its own copy cannot be left behind")));
        }
        let vm = self.mirror_owner(name, generation, site)?;
        vm.copies.retain(|s| s != site);
        Ok(Applied::Done)
    }

    /// `mirror-switched`: the host running `name` in `generation` lost its own site's copy and
    /// goes on on `site`'s, which must be current (its mirror was in sync): that copy is then
    /// the only current one. Its own site's copy never was written after the failed request
    /// (the write-blocking mirror writes it first), so nothing acknowledged is lost by leaving
    /// it behind; the guest waits, paused, until this is committed.
    pub(super) fn mirror_switched(&mut self, name: &str, generation: u64, site: &str) -> Result<Applied, StateError> {
        let running_site = self.vms.get(name).and_then(VmRecord::assignment).and_then(|a| self.hosts.get(&a.host)).and_then(|h| h.site.clone());
        if running_site.as_deref() == Some(site) {
            return Err(StateError::Stale(format!("VM '{name}' runs at site '{site}': it cannot switch to its own copy")));
        }
        let vm = self.mirror_owner(name, generation, site)?;
        if !vm.copies.iter().any(|s| s == site) {
            return Err(StateError::Stale(format!("site '{site}'s copy of VM '{name}' is not current: nothing to switch to")));
        }
        vm.copies = vec![site.to_string()];
        Ok(Applied::Done)
    }

    /// The site-mirrored VM `name`, if it is still assigned in `generation` and `site` is a
    /// site some host names.
    fn mirror_owner(&mut self, name: &str, generation: u64, site: &str) -> Result<&mut VmRecord, StateError> {
        if !self.hosts.values().any(|h| h.site.as_deref() == Some(site)) {
            return Err(StateError::BadSite(site.to_string()));
        }
        let vm = self.vm_mut(name)?;
        if !vm.spec.site_mirrored() {
            return Err(StateError::NotMirrored(name.to_string()));
        }
        if vm.assignment().is_none_or(|a| a.generation != generation) {
            return Err(StateError::Stale(format!("VM '{name}' is not running in generation {generation}")));
        }
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use crate::placement::LeftDown;

    /// Hosts 0, 1 at site a; 2, 3 at site b; one site-mirrored VM.
    fn two_sites() -> ClusterState {
        let mut s = ClusterState::default();
        for i in 0..4u32 {
            s.apply(&Command::AddHost {
                id: HostId(i),
                name: format!("h{i}"),
                api_addr: String::new(),
                heartbeat_addr: String::new(),
                capacity: Capacity { vcpus: 8, memory_mib: 4096 },
            })
            .expect("add");
            s.apply(&Command::HostJoined { host: HostId(i) }).expect("join");
            let site = if i < 2 { "a" } else { "b" };
            s.apply(&Command::SetHostSite { host: HostId(i), site: Some(site.into()) }).expect("site");
        }
        let mut spec = VmSpec::process("db", 512, 0, &["true"]);
        spec.disks = vec![DiskSpec { path: "db.raw".into(), format: None, readonly: false, local: false, mirror: true }];
        s.apply(&Command::CreateVm { spec }).expect("create");
        s
    }

    fn generation(s: &ClusterState) -> u64 {
        s.vms["db"].assignment().expect("assigned").generation
    }

    /// Starts `db` on host 0 (site a) and commits its mirror into b's copy in sync; its
    /// generation.
    fn run_at_a_in_sync(s: &mut ClusterState) -> u64 {
        s.apply(&Command::SetPower { name: "db".into(), desired: PowerState::Running, force: true }).expect("start");
        s.apply(&Command::Assign { name: "db".into(), host: HostId(0) }).expect("assign");
        let g = generation(s);
        s.apply(&Command::MirrorSynced { name: "db".into(), generation: g, site: "b".into() }).expect("synced");
        g
    }

    #[test]
    fn a_start_leaves_its_sites_copy_the_only_current_one_until_a_mirror_catches_up() {
        let mut s = two_sites();
        s.apply(&Command::SetPower { name: "db".into(), desired: PowerState::Running, force: true }).expect("start");
        assert!(s.copy_current_on(&s.vms["db"], HostId(2)), "before it first ran, every site's copy may start it");
        s.apply(&Command::Assign { name: "db".into(), host: HostId(0) }).expect("assign");
        assert_eq!(s.vms["db"].copies, vec!["a".to_string()]);
        let g = generation(&s);
        s.apply(&Command::MirrorSynced { name: "db".into(), generation: g, site: "b".into() }).expect("synced");
        assert_eq!(s.vms["db"].copies, vec!["a".to_string(), "b".to_string()]);
        // A report of an older generation, an unknown site, or the running site's own copy.
        assert!(matches!(s.apply(&Command::MirrorDegraded { name: "db".into(), generation: g - 1, site: "b".into() }), Err(StateError::Stale(_))));
        assert!(matches!(s.apply(&Command::MirrorDegraded { name: "db".into(), generation: g, site: "c".into() }), Err(StateError::BadSite(_))));
        assert!(matches!(s.apply(&Command::MirrorDegraded { name: "db".into(), generation: g, site: "a".into() }), Err(StateError::Stale(_))));
        assert_eq!(s.copies_to_leave_behind("db", HostId(0)), vec!["b".to_string()], "a start again in this generation leaves b behind first");
        s.apply(&Command::MirrorDegraded { name: "db".into(), generation: g, site: "b".into() }).expect("degraded");
        assert_eq!(s.vms["db"].copies, vec!["a".to_string()]);
        assert!(s.copies_to_leave_behind("db", HostId(0)).is_empty());
    }

    /// A storage path failover: the host at site a goes on on b's copy, which must be current;
    /// then only b's copy is — a start at site a (another host there, or this one again in the
    /// same generation) is refused, and nothing is left to leave behind there.
    #[test]
    fn a_switch_to_the_other_sites_copy_leaves_it_the_only_current_one() {
        let mut s = two_sites();
        s.apply(&Command::SetPower { name: "db".into(), desired: PowerState::Running, force: true }).expect("start");
        let Applied::Assigned { generation: g, .. } = s.apply(&Command::Assign { name: "db".into(), host: HostId(0) }).expect("assign") else {
            panic!("not assigned")
        };
        let switched = Command::MirrorSwitched { name: "db".into(), generation: g, site: "b".into() };
        assert!(matches!(s.apply(&switched), Err(StateError::Stale(_))), "b's copy is not current yet");
        s.apply(&Command::MirrorSynced { name: "db".into(), generation: g, site: "b".into() }).expect("synced");
        assert!(matches!(s.apply(&Command::MirrorSwitched { name: "db".into(), generation: g, site: "a".into() }), Err(StateError::Stale(_))), "its own copy");
        assert!(matches!(s.apply(&Command::MirrorSwitched { name: "db".into(), generation: g + 1, site: "b".into() }), Err(StateError::Stale(_))));
        s.apply(&switched).expect("switched");
        assert_eq!(s.vms["db"].copies, vec!["b".to_string()]);
        let vm = s.vms["db"].clone();
        assert!(!s.copy_current_on(&vm, HostId(0)) && !s.copy_current_on(&vm, HostId(1)));
        assert!(s.copy_current_on(&vm, HostId(2)));
        assert!(s.copies_to_leave_behind("db", HostId(0)).is_empty(), "b's copy is never left behind by a start at a");
    }

    /// Live moves go within the site first: an evacuation takes the VM to the other host of its
    /// site; with none there, to the other site while its copy is current (the mirror in
    /// sync), and nowhere while it is not. A move to the other site leaves the copy at the
    /// site left behind until the mirror from the new site catches it up.
    #[test]
    fn a_mirrored_vm_moves_live_within_its_site_first_then_to_a_site_whose_copy_is_current() {
        let mut s = two_sites();
        s.apply(&Command::SetPower { name: "db".into(), desired: PowerState::Running, force: true }).expect("start");
        s.apply(&Command::Assign { name: "db".into(), host: HostId(0) }).expect("assign");
        let g = generation(&s);
        let to_b = s.start_migration_command("db", HostId(2), true, false);
        assert!(matches!(&to_b, Command::StartMigration { across_sites: true, .. }), "{to_b:?}");
        assert!(matches!(s.clone().apply(&to_b), Err(StateError::StaleCopy { .. })), "b's copy is not current yet");
        // An entry that does not say the move crosses sites (an older release's) is refused,
        // as that release refused it; one that says so of a move within the site too.
        let unsaid = Command::StartMigration { name: "db".into(), to: HostId(2), force: true, evacuation: false, across_sites: false };
        assert!(matches!(s.clone().apply(&unsaid), Err(StateError::NotMigratable { .. })));
        let missaid = Command::StartMigration { name: "db".into(), to: HostId(1), force: true, evacuation: false, across_sites: true };
        assert!(matches!(s.clone().apply(&missaid), Err(StateError::NotMigratable { .. })));
        s.apply(&Command::MirrorSynced { name: "db".into(), generation: g, site: "b".into() }).expect("synced");
        // Site b's host 2 has the most free memory: the other host of site a is chosen all the same.
        s.apply(&Command::CreateVm { spec: VmSpec::process("filler", 2048, 0, &["true"]) }).expect("filler");
        s.apply(&Command::SetPower { name: "filler".into(), desired: PowerState::Running, force: true }).expect("start");
        s.apply(&Command::Assign { name: "filler".into(), host: HostId(1) }).expect("assign");
        let plan = crate::evacuation::evacuation_plan(&s, HostId(0));
        assert_eq!(plan, vec![("db".to_string(), Ok(HostId(1)))], "the other host of site a");
        s.apply(&Command::SetHostMode { host: HostId(1), mode: HostMode::Maintenance, force: true }).expect("mode");
        let plan = crate::evacuation::evacuation_plan(&s, HostId(0));
        assert_eq!(plan, vec![("db".to_string(), Ok(HostId(2)))], "site b, whose copy is current");
        let Applied::MigrationStarted { to, .. } = s.apply(&to_b).expect("a move to site b") else { panic!("not started") };
        let switchover = s.switchover_command("db", to.generation);
        s.apply(&switchover).expect("switchover");
        assert_eq!(s.vms["db"].copies, vec!["b".to_string()], "site a's copy is left behind until the mirror from b catches it up");
        // Back to a: not before a's copy is current again.
        let back = s.start_migration_command("db", HostId(0), true, false);
        assert!(matches!(s.clone().apply(&back), Err(StateError::StaleCopy { .. })));
        assert_eq!(s.migration_target("db"), Some(HostId(3)), "the other host of site b");
        s.apply(&Command::SetHostMode { host: HostId(3), mode: HostMode::Maintenance, force: true }).expect("mode");
        assert_eq!(s.migration_target("db"), None);
        let plan = crate::evacuation::evacuation_plan(&s, HostId(2));
        assert!(matches!(&plan[..], [(vm, Err(why))] if vm == "db" && why.contains("whose copy is current")), "{plan:?}");
        s.apply(&Command::MirrorSynced { name: "db".into(), generation: to.generation, site: "a".into() }).expect("synced");
        assert_eq!(s.migration_target("db"), Some(HostId(0)));
    }

    /// Three sites: a new link writes the copy at the VM's home's site when it has one (an
    /// evacuated VM goes back only once that copy is current), else the first other site by
    /// name with an active host.
    #[test]
    fn a_new_link_writes_the_copy_at_the_vms_home_site_first() {
        let mut s = two_sites();
        s.apply(&Command::AddHost {
            id: HostId(4),
            name: "h4".into(),
            api_addr: String::new(),
            heartbeat_addr: String::new(),
            capacity: Capacity { vcpus: 8, memory_mib: 4096 },
        })
        .expect("add");
        s.apply(&Command::HostJoined { host: HostId(4) }).expect("join");
        s.apply(&Command::SetHostSite { host: HostId(4), site: Some("w".into()) }).expect("site");
        s.apply(&Command::SetPower { name: "db".into(), desired: PowerState::Running, force: true }).expect("start");
        s.apply(&Command::Assign { name: "db".into(), host: HostId(4) }).expect("assign");
        assert_eq!(s.mirror_site_for(&s.vms["db"], HostId(4)).as_deref(), Some("a"), "the first other site by name");
        let g = generation(&s);
        s.apply(&Command::MirrorSynced { name: "db".into(), generation: g, site: "a".into() }).expect("synced");
        // Evacuated from w to a: its mirror goes back to w, its home.
        s.apply(&Command::SetHostMode { host: HostId(4), mode: HostMode::Maintenance, force: true }).expect("mode");
        let to = s.migration_target("db").expect("a target");
        let Applied::MigrationStarted { to, .. } = s.apply(&s.start_migration_command("db", to, true, true)).expect("evacuation") else {
            panic!("not started")
        };
        s.apply(&s.switchover_command("db", to.generation)).expect("switchover");
        assert_eq!(s.vms["db"].home, Some(HostId(4)));
        assert_eq!(s.mirror_site_for(&s.vms["db"], to.host).as_deref(), Some("w"), "its home's site");
        // Its home's site without an active host: the first other site that has one.
        s.apply(&Command::SetHostMode { host: HostId(4), mode: HostMode::Normal, force: true }).expect("mode");
        s.apply(&Command::Failover { host: HostId(4), epoch: 1, plan: vec![] }).expect("h4 fails");
        let other = if to.host.0 < 2 { "b" } else { "a" };
        assert_eq!(s.mirror_site_for(&s.vms["db"], to.host).as_deref(), Some(other));
    }

    /// A live move within site a while the source's storage fails: the source switches onto
    /// b's copy (then the only current one), so the destination at site a — which opened a's
    /// copy, stale from that commit on — must not take the VM over: the switchover is refused
    /// (the source aborts the move and goes on), never applied to every host as a placement
    /// at a stale copy.
    #[test]
    fn a_switchover_onto_a_copy_that_became_stale_during_the_move_is_refused() {
        let mut s = two_sites();
        let g = run_at_a_in_sync(&mut s);
        let Applied::MigrationStarted { to, .. } =
            s.apply(&Command::StartMigration { name: "db".into(), to: HostId(1), force: true, evacuation: false, across_sites: false }).expect("starts")
        else {
            panic!("not started")
        };
        s.apply(&Command::MirrorSwitched { name: "db".into(), generation: g, site: "b".into() }).expect("switched");
        let switchover = s.switchover_command("db", to.generation);
        assert!(matches!(s.apply(&switchover), Err(StateError::StaleCopy { .. })), "the destination's copy is stale");
        assert_eq!(s.vms["db"].migrating_to(), Some(to), "still the source's until it aborts");
        s.apply(&Command::MigrationAbort { name: "db".into(), generation: to.generation, reason: "stale".into() }).expect("abort");
        assert_eq!(s.vms["db"].assignment().map(|a| a.host), Some(HostId(0)));
        assert_eq!(s.vms["db"].copies, vec!["b".to_string()]);
    }

    #[test]
    fn a_failover_restarts_only_where_the_copy_is_current() {
        let mut s = two_sites();
        run_at_a_in_sync(&mut s);
        // Site a lost with both copies current: the VM restarts at site b, whose copy is then
        // the only current one.
        let plan = s.plan_failure(&[HostId(0), HostId(1)], [HostId(2), HostId(3)].into_iter().collect());
        assert!(plan.placements.iter().any(|(n, h)| n == "db" && h.0 >= 2), "{plan:?}");

        // The copy at b stale: site a's loss leaves the VM down, and nothing places it at b.
        let mut t = two_sites();
        t.apply(&Command::SetPower { name: "db".into(), desired: PowerState::Running, force: true }).expect("start");
        t.apply(&Command::Assign { name: "db".into(), host: HostId(0) }).expect("assign");
        let loss = t.plan_failure(&[HostId(0), HostId(1)], [HostId(2), HostId(3)].into_iter().collect());
        assert_eq!(loss.left_down, vec![("db".to_string(), LeftDown::NoCurrentCopy)], "a stale copy restarts nothing");
        let g = generation(&t);
        t.apply(&Command::SetPower { name: "db".into(), desired: PowerState::Stopped, force: true }).expect("stop");
        t.apply(&Command::Release { name: "db".into(), host: HostId(0), generation: g }).expect("release");
        t.apply(&Command::SetPower { name: "db".into(), desired: PowerState::Running, force: true }).expect("start");
        assert!(matches!(t.apply(&Command::Assign { name: "db".into(), host: HostId(2) }), Err(StateError::StaleCopy { .. })));
        assert!(!t.copy_current_on(&t.vms["db"], HostId(2)));
        let placed = t.place(&["db".to_string()], t.active_hosts(), true).placements;
        assert!(!placed.is_empty() && placed.iter().all(|(_, h)| h.0 < 2), "placed only at the site with the current copy: {placed:?}");
        assert!(t.copy_current_on(&t.vms["db"], HostId(1)), "another host of the same site shares its copy");
    }
}
