//! `apply`: the only mutator of the desired state, deterministic and all-or-nothing (one function
//! per command, dispatched from `apply_command`), and the
//! checks a placement passes when it is applied (on every host, against the state at that point
//! of the log).

use super::admission::AdmitMode;
use super::*;

impl ClusterState {
    /// Applies one command of log format 1 or 2 (admission judged here). On error nothing
    /// changed.
    pub fn apply(&mut self, cmd: &Command) -> Result<Applied, StateError> {
        self.apply_with(cmd, AdmitMode::InApply)
    }

    /// Applies one command, admission as `mode` says; every command applied raises the revision.
    pub(crate) fn apply_with(&mut self, cmd: &Command, mode: AdmitMode<'_>) -> Result<Applied, StateError> {
        let applied = self.apply_command(cmd, mode)?;
        self.assert_placed_within_bounds(&applied);
        self.note_copies(&applied);
        self.revision += 1;
        Ok(applied)
    }

    /// Invariants of a placement just applied; a violation is a bug in `apply` (every target
    /// was checked by `check_target`), and committing it would spread it to every host, so it
    /// stops here. A failover leaves nothing assigned to the failed host, and no host a VM was
    /// just placed on holds more memory than it has.
    fn assert_placed_within_bounds(&self, applied: &Applied) {
        let targets: Vec<HostId> = match applied {
            Applied::Assigned { host, .. } => vec![*host],
            Applied::FailedOver { host, moved, .. } => {
                assert!(self.assigned_to(*host).next().is_none(), "a failover of {host} left VMs assigned to it");
                moved.iter().map(|(_, to, _)| *to).collect()
            }
            _ => return,
        };
        for h in targets {
            let (used, capacity) = (self.used(h).memory_mib, self.hosts.get(&h).map_or(0, |r| r.capacity.memory_mib));
            assert!(used <= capacity, "apply placed {used} MiB on {h}, which has {capacity} MiB");
        }
    }

    fn apply_command(&mut self, cmd: &Command, mode: AdmitMode<'_>) -> Result<Applied, StateError> {
        match cmd {
            Command::AddHost { id, name, api_addr, heartbeat_addr, capacity } => self.add_host(*id, name, api_addr, heartbeat_addr, *capacity),
            Command::HostJoined { host } => self.host_joined(*host),
            Command::CreateVm { spec } => self.create_vm(spec),
            Command::DeleteVm { name } => self.delete_vm(name),
            Command::SetPower { name, desired, .. } => self.set_power(mode, cmd, name, *desired),
            Command::UpdateVm { spec, .. } => self.update_vm(mode, cmd, spec),
            Command::SetHostMode { host, mode: host_mode, .. } => self.set_host_mode(mode, cmd, *host, *host_mode),
            Command::SetRule { rule, .. } => self.set_rule(mode, cmd, rule),
            Command::VmFailed { name, host, generation, detail } => self.vm_failed(name, *host, *generation, detail),
            Command::StopExited { name, host, generation } => self.stop_exited(name, *host, *generation),
            Command::SetHostSite { host, site } => self.set_host_site(*host, site.as_deref()),
            Command::SetWitness { disk } => {
                self.disk_witness = *disk;
                Ok(Applied::Done)
            }
            Command::SetToken { token } => self.set_token(token),
            Command::DeleteToken { name } => self.delete_token(name),
            Command::ReleaseHeld { names } => self.release_held(names),
            Command::CapacityRetry { name } => self.capacity_retry(name),
            Command::ClearVmError { name } => self.clear_vm_error(name),
            Command::DeleteRule { name } => self.delete_rule(name),
            Command::SetSettings { settings, .. } => self.set_settings(mode, cmd, settings),
            Command::Assign { name, host } => self.assign(name, *host),
            Command::Release { name, host, generation } => self.release(name, *host, *generation),
            Command::Failover { host, epoch, plan } => self.failover(*host, *epoch, plan),
            Command::StartMigration { name, to, evacuation, across_sites, .. } => self.start_migration(mode, cmd, name, *to, *evacuation, *across_sites),
            Command::MigrationSwitchover { name, generation, arrives_home } => self.migration_switchover(name, *generation, *arrives_home),
            Command::MigrationAbort { name, generation, reason } => self.migration_abort(name, *generation, reason),
            Command::HostLeave { host, epoch, hold_ms } => self.host_leave(*host, *epoch, *hold_ms),
            Command::ReleaseParked { host } => self.release_parked(*host),
            Command::MirrorSynced { name, generation, site } => self.mirror_synced(name, *generation, site),
            Command::MirrorDegraded { name, generation, site } => self.mirror_degraded(name, *generation, site),
            Command::MirrorSwitched { name, generation, site } => self.mirror_switched(name, *generation, site),
        }
    }

    fn add_host(&mut self, id: HostId, name: &str, api_addr: &str, heartbeat_addr: &str, capacity: Capacity) -> Result<Applied, StateError> {
        if !id.is_valid() || self.hosts.contains_key(&id) {
            return Err(StateError::BadHostId(id.0));
        }
        if !valid_name(name) {
            return Err(StateError::BadHostName(name.to_string()));
        }
        if self.host_by_name(name).is_some() {
            return Err(StateError::HostExists(name.to_string()));
        }
        self.hosts.insert(
            id,
            HostRecord {
                id,
                name: name.to_string(),
                api_addr: api_addr.to_string(),
                heartbeat_addr: heartbeat_addr.to_string(),
                capacity,
                status: HostStatus::Joining,
                epoch: 0,
                mode: HostMode::Normal,
                site: None,
            },
        );
        Ok(Applied::Done)
    }

    fn host_joined(&mut self, host: HostId) -> Result<Applied, StateError> {
        let h = self.hosts.get_mut(&host).ok_or(StateError::UnknownHost(host))?;
        h.status = HostStatus::Active;
        h.epoch += 1;
        let epoch = h.epoch;
        self.unpark_on_return(host, epoch)
    }

    fn create_vm(&mut self, spec: &VmSpec) -> Result<Applied, StateError> {
        spec.validate().map_err(|e| StateError::InvalidSpec(e.to_string()))?;
        if self.vms.contains_key(&spec.name) {
            return Err(StateError::VmExists(spec.name.clone()));
        }
        self.vms.insert(spec.name.clone(), VmRecord::new(spec.clone()));
        Ok(Applied::Done)
    }

    fn delete_vm(&mut self, name: &str) -> Result<Applied, StateError> {
        let vm = self.vms.get(name).ok_or_else(|| StateError::UnknownVm(name.to_string()))?;
        if !matches!(vm.phase, VmPhase::Stopped | VmPhase::Failed { .. }) {
            return Err(StateError::VmNotStopped(name.to_string()));
        }
        self.vms.remove(name);
        Ok(Applied::Done)
    }

    fn set_power(&mut self, mode: AdmitMode<'_>, cmd: &Command, name: &str, desired: PowerState) -> Result<Applied, StateError> {
        if let Some(e) = self.vm_mut(name)?.error().map(str::to_string).filter(|_| desired == PowerState::Running) {
            return Err(StateError::VmInError { name: name.to_string(), error: e });
        }
        self.admit(mode, cmd, |s| {
            if let Some(v) = s.vms.get_mut(name) {
                v.set_desired(desired);
            }
            Ok(())
        })
    }

    fn update_vm(&mut self, mode: AdmitMode<'_>, cmd: &Command, spec: &VmSpec) -> Result<Applied, StateError> {
        spec.validate().map_err(|e| StateError::InvalidSpec(e.to_string()))?;
        let vm = self.vms.get(&spec.name).ok_or_else(|| StateError::UnknownVm(spec.name.clone()))?;
        if let Some(a) = vm.assignment() {
            if !self.fits_with(a.host, spec.demand(), Some(&spec.name)) {
                return Err(StateError::NoCapacity { vm: spec.name.clone(), host: a.host });
            }
        }
        self.admit(mode, cmd, |s| {
            if let Some(v) = s.vms.get_mut(&spec.name) {
                v.spec = spec.clone();
                // A local disk added to a running VM is created where it runs.
                if let Some(a) = v.assignment() {
                    v.note_disk_host(a.host);
                }
            }
            Ok(())
        })
    }

    fn set_host_mode(&mut self, mode: AdmitMode<'_>, cmd: &Command, host: HostId, host_mode: HostMode) -> Result<Applied, StateError> {
        self.hosts.get(&host).ok_or(StateError::UnknownHost(host))?;
        self.admit(mode, cmd, |s| {
            if let Some(h) = s.hosts.get_mut(&host) {
                h.mode = host_mode;
            }
            Ok(())
        })
    }

    fn set_rule(&mut self, mode: AdmitMode<'_>, cmd: &Command, rule: &Rule) -> Result<Applied, StateError> {
        self.check_rule(rule)?;
        let violations = self.rule_violations(rule);
        let applied = self.admit(mode, cmd, |s| {
            s.rules.insert(rule.name.clone(), rule.clone());
            Ok(())
        })?;
        Ok(match applied {
            Applied::Done => Applied::RuleSet { violations },
            other => other,
        })
    }

    fn vm_failed(&mut self, name: &str, host: HostId, generation: u64, detail: &str) -> Result<Applied, StateError> {
        let active = self.active_hosts();
        let vm = self.vm_mut(name)?;
        if vm.assignment() != Some(Assignment { host, generation }) {
            return Err(StateError::Stale(format!("VM '{name}' is not assigned to {host} in generation {generation}")));
        }
        vm.unassign();
        if !vm.failed_on.contains(&host) {
            vm.failed_on.push(host);
        }
        // Out of tries, or out of hosts to try: a small cluster runs out before the budget.
        if vm.failed_on.len() > MAX_RELOCATIONS || active.iter().all(|h| vm.failed_on.contains(&h)) {
            let hosts: Vec<String> = vm.failed_on.iter().map(ToString::to_string).collect();
            let error = format!("gave up after failing on hosts {}: {detail}", hosts.join(", "));
            vm.fail(error.clone());
            return Ok(Applied::VmInError { name: name.to_string(), error });
        }
        Ok(Applied::Relocating { name: name.to_string(), failed_on: vm.failed_on.clone() })
    }

    fn stop_exited(&mut self, name: &str, host: HostId, generation: u64) -> Result<Applied, StateError> {
        let vm = self.vm_mut(name)?;
        if vm.assignment() != Some(Assignment { host, generation }) {
            return Err(StateError::Stale(format!("VM '{name}' is not assigned to {host} in generation {generation}")));
        }
        // Stopping where it ran: the host releases it once it has seen the stop (it exited
        // already), as after an operator's stop.
        vm.set_desired(PowerState::Stopped);
        Ok(Applied::Done)
    }

    fn set_token(&mut self, token: &ApiToken) -> Result<Applied, StateError> {
        if !valid_name(&token.name) {
            return Err(StateError::BadToken(format!("name '{}' must be 1-63 letters, digits, '-' or '_'", token.name)));
        }
        if token.sha256.len() != 64 || !token.sha256.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
            return Err(StateError::BadToken("sha256 must be 64 lower-case hex digits".into()));
        }
        if self.tokens.contains_key(&token.name) {
            return Err(StateError::TokenExists(token.name.clone()));
        }
        self.tokens.insert(token.name.clone(), token.clone());
        Ok(Applied::Done)
    }

    fn delete_token(&mut self, name: &str) -> Result<Applied, StateError> {
        self.tokens.remove(name).ok_or_else(|| StateError::UnknownToken(name.to_string()))?;
        Ok(Applied::Done)
    }

    fn release_held(&mut self, names: &[String]) -> Result<Applied, StateError> {
        for name in names {
            if let Some(vm) = self.vms.get_mut(name) {
                vm.release_hold();
            }
        }
        Ok(Applied::Done)
    }

    fn capacity_retry(&mut self, name: &str) -> Result<Applied, StateError> {
        let vm = self.vm_mut(name)?;
        let VmPhase::Waiting { capacity_retries: Some(spent) } = vm.phase else {
            return Err(StateError::Stale(format!("VM '{name}' is not waiting for capacity")));
        };
        let attempt = spent + 1;
        if attempt >= BEST_EFFORT_RETRIES {
            vm.phase = VmPhase::Stopped;
            return Ok(Applied::GaveUpWaiting { name: name.to_string() });
        }
        vm.phase = VmPhase::Waiting { capacity_retries: Some(attempt) };
        Ok(Applied::StillWaiting { name: name.to_string(), attempt })
    }

    fn clear_vm_error(&mut self, name: &str) -> Result<Applied, StateError> {
        self.vm_mut(name)?.clear_failure();
        Ok(Applied::Done)
    }

    fn delete_rule(&mut self, name: &str) -> Result<Applied, StateError> {
        self.rules.remove(name).ok_or_else(|| StateError::UnknownRule(name.to_string()))?;
        Ok(Applied::Done)
    }

    fn set_settings(&mut self, mode: AdmitMode<'_>, cmd: &Command, settings: &Settings) -> Result<Applied, StateError> {
        if !(100..=1600).contains(&settings.vcpu_overcommit_pct) {
            return Err(StateError::BadSetting(format!("vcpu_overcommit_pct = {} is outside 100..=1600", settings.vcpu_overcommit_pct)));
        }
        if let Some(s) = settings.preferred_site.as_deref().filter(|s| !crate::spec::valid_name(s)) {
            return Err(StateError::BadSite(s.to_string()));
        }
        if settings.ftt_target.is_some_and(|t| t as usize >= crate::hostset::MAX_HOSTS) {
            return Err(StateError::BadSetting("ftt_target is larger than any cluster".into()));
        }
        if let Some((g, d)) = settings.group_delays_ms.iter().find(|(g, d)| **g > MAX_RESTART_GROUP || **d > MAX_GROUP_DELAY_MS) {
            return Err(StateError::BadSetting(format!(
                "restart group {g} delay {d} ms: groups are 0..={MAX_RESTART_GROUP}, delays at most {MAX_GROUP_DELAY_MS} ms"
            )));
        }
        self.admit(mode, cmd, |s| {
            s.settings = settings.clone();
            Ok(())
        })
    }

    fn assign(&mut self, name: &str, host: HostId) -> Result<Applied, StateError> {
        let vm = self.vms.get(name).ok_or_else(|| StateError::UnknownVm(name.to_string()))?;
        if !vm.is_waiting() {
            return Err(StateError::NotPlaceable(name.to_string()));
        }
        let demand = vm.spec.demand();
        self.check_target(name, host, demand)?;
        let generation = self.next_gen();
        self.vm_mut(name)?.place(Assignment { host, generation }, false);
        Ok(Applied::Assigned { name: name.to_string(), host, generation })
    }

    fn release(&mut self, name: &str, host: HostId, generation: u64) -> Result<Applied, StateError> {
        let vm = self.vm_mut(name)?;
        if vm.assignment() != Some(Assignment { host, generation }) {
            return Err(StateError::Stale(format!("VM '{name}' is not assigned to {host} in generation {generation}")));
        }
        if !matches!(vm.phase, VmPhase::Stopping { .. }) {
            return Err(StateError::Stale(format!("VM '{name}' is desired running again")));
        }
        vm.unassign();
        Ok(Applied::Done)
    }

    /// Whether committed state lets `name` be assigned to `host` now: active, in normal mode,
    /// with room, and no hard rule broken. The proposer planned it on its own copy; this is
    /// checked again on every host, when applied, against the state at that point of the log.
    pub(super) fn check_target(&self, name: &str, host: HostId, demand: Capacity) -> Result<(), StateError> {
        let h = self.hosts.get(&host).ok_or(StateError::UnknownHost(host))?;
        if h.status != HostStatus::Active {
            return Err(StateError::HostNotActive(host));
        }
        if h.mode != HostMode::Normal {
            return Err(StateError::HostMode { host, mode: h.mode });
        }
        if !self.fits(host, demand) {
            return Err(StateError::NoCapacity { vm: name.to_string(), host });
        }
        if let Some(rule) = self.broken_hard_rule(name, host) {
            return Err(StateError::BreaksHardRule { vm: name.to_string(), host, rule });
        }
        if let Some(vm) = self.vms.get(name).filter(|v| !self.copy_current_on(v, host)) {
            return Err(StateError::StaleCopy { vm: name.to_string(), host, current: vm.copies.join(", ") });
        }
        Ok(())
    }

    /// The first hard rule that assigning `name` to `host` would break, given where the other
    /// members of its rules are assigned now.
    fn broken_hard_rule(&self, name: &str, host: HostId) -> Option<String> {
        let placed_on = |vm: &str| self.vms.get(vm).and_then(VmRecord::assignment).map(|a| a.host);
        self.rules.values().filter(|r| r.hard && r.vms.iter().any(|v| v == name)).find_map(|r| {
            let others = r.vms.iter().filter(|v| *v != name).filter_map(|v| placed_on(v));
            let broken = match r.kind {
                RuleKind::AntiAffinity => others.into_iter().any(|h| h == host),
                RuleKind::Affinity => others.into_iter().any(|h| h != host),
                RuleKind::Site => self.hosts.get(&host).is_none_or(|h| h.site != r.site),
            };
            broken.then(|| r.name.clone())
        })
    }

    fn failover(&mut self, host: HostId, epoch: u64, plan: &[(String, HostId)]) -> Result<Applied, StateError> {
        let h = self.hosts.get(&host).ok_or(StateError::UnknownHost(host))?;
        if h.status != HostStatus::Active || h.epoch != epoch {
            return Err(StateError::Stale(format!("failover of {host} epoch {epoch}, but the host is {:?} in epoch {}", h.status, h.epoch)));
        }
        if let Some(h) = self.hosts.get_mut(&host) {
            h.status = HostStatus::Failed;
        }
        self.abort_migrations_to(host);
        // Everything on the failed host is released first, so capacity is counted without it.
        // A VM whose disk is on that host's own storage cannot start anywhere else: it is
        // parked with the host, and starts there again when it rejoins (fenced, it runs nothing
        // until then).
        let victims: Vec<String> = self.assigned_to(host).map(|v| v.spec.name.clone()).collect();
        for name in &victims {
            if let Some(vm) = self.vms.get_mut(name) {
                if vm.spec.bound_to_host() && vm.spec.protection != Protection::Off {
                    vm.park(host, None);
                } else {
                    vm.unassign();
                }
            }
        }
        let mut moved = Vec::new();
        for (name, target) in plan {
            let Some(vm) = self.vms.get(name) else { continue };
            if !victims.contains(name) || !vm.is_waiting() || *target == host {
                continue;
            }
            let demand = vm.spec.demand();
            if self.check_target(name, *target, demand).is_err() {
                continue;
            }
            let generation = self.next_gen();
            moved.push((name.clone(), *target, generation));
        }
        // Restart order: the lowest group among the moved VMs starts now; the higher ones are
        // held until the coordinator sees the lower groups run (or their delay passes).
        let first_group = moved.iter().filter_map(|(n, _, _)| self.vms.get(n)).map(|v| v.spec.restart_group).min();
        for (name, target, generation) in &moved {
            if let Some(vm) = self.vms.get_mut(name) {
                let held = first_group.is_some_and(|g| vm.spec.restart_group > g);
                vm.place(Assignment { host: *target, generation: *generation }, held);
            }
        }
        let mut left_down = Vec::new();
        for name in &victims {
            let Some(vm) = self.vms.get_mut(name) else { continue };
            if vm.is_waiting() {
                left_down.push(name.clone());
                // Protected VMs stay wanted and are placed as soon as capacity appears; best-effort
                // ones wait for a bounded number of retries; `off` ones are stopped.
                match vm.spec.protection {
                    Protection::Protect => {}
                    Protection::BestEffort => vm.phase = VmPhase::Waiting { capacity_retries: Some(0) },
                    Protection::Off => vm.phase = VmPhase::Stopped,
                }
            } else if vm.parked().is_some() {
                left_down.push(name.clone());
            }
        }
        Ok(Applied::FailedOver { host, moved, left_down })
    }
}
